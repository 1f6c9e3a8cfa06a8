"""A reranker model folder: `reranker.json` (+ an optional LoRA adapter and the model card) -> a `Reranker`.

    reranker.json         RerankerConfig: backbone, prompt template, budgets, window, LoRA shape (0: none), and
                          the default mode and fusion (what the model was trained to do well)
    adapter.safetensors   LoRA A/B per target linear (`layers.3.attention.wqkv.lora_A` ...), merged at load
    README.md             the model card: what it is, the command and data that made it
    train_log.json        written by train.py

Shipped folders live in `reranker/models/<name>/` (package data). `sieve-rank` ships without an adapter until a
training run is committed: it is then the base instruct model, zero-shot, and everything works the same.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from sieve.backbone.lora import merge_lora  # noqa: F401 (re-exported)

CONFIG = "reranker.json"
ADAPTER = "adapter.safetensors"
LORA_TARGETS = ["wqkv", "wo", "w13", "w2"]
DEFAULT = "sieve-rank"


@dataclass
class RerankerConfig:
    backbone: str = "smollm2-135m-instruct"
    template: str = "rankgpt"
    max_passage_tokens: int = 256
    max_query_tokens: int = 128
    min_passage_tokens: int = 8
    window: int = 20
    stride: int = 10
    lora_r: int = 0  # 0: no adapter (the base model, zero-shot)
    lora_alpha: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    mode: str = "full"  # how the model ranks when a call does not say (Rerank's UNSPECIFIED, Search(rerank))
    fuse: bool = False  # ... and whether it fuses its order with the first stage's (RRF) by default
    inline_window: int | None = None  # inline mode: passages per prompt (None: all in one)
    likelihood_cap: str = "list"  # likelihood mode: "list" (the one-pass prompt's per-passage cap) or "passage"

    def save(self, folder: Path) -> None:
        (folder / CONFIG).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> RerankerConfig:
        raw = json.loads((folder / CONFIG).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def packaged(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("sieve.reranker") / "models" / name))


def resolve_reranker(name_or_path: str) -> Path:
    """A shipped reranker name (a folder under reranker/models) or a folder path."""
    if "/" not in name_or_path and (packaged(name_or_path) / CONFIG).is_file():
        return packaged(name_or_path)
    path = Path(name_or_path).expanduser()
    if not (path / CONFIG).is_file():
        shipped = sorted(p.name for p in packaged("").iterdir() if (p / CONFIG).is_file())
        raise FileNotFoundError(f"no reranker at {path}: expected {CONFIG}; shipped: {', '.join(shipped)}")
    return path


def reranker_from_config(backbone, cfg: RerankerConfig, *, name: str):
    from .listwise import Reranker
    from .prompt import TEMPLATES

    if cfg.template not in TEMPLATES:
        raise ValueError(f"unknown prompt template {cfg.template!r}; known: {', '.join(TEMPLATES)}")
    return Reranker(backbone, name=name, template=TEMPLATES[cfg.template], max_passage_tokens=cfg.max_passage_tokens,
                    max_query_tokens=cfg.max_query_tokens, min_passage_tokens=cfg.min_passage_tokens,
                    window=cfg.window, stride=cfg.stride, mode=cfg.mode, fuse=cfg.fuse,
                    inline_window=cfg.inline_window, likelihood_cap=cfg.likelihood_cap)


def load_reranker(name_or_path: str | Path = DEFAULT, *, home: str | Path, device: str = "auto",
                  dtype: str = "auto", backbone=None):
    """Load a reranker folder (its backbone, adapter merged). `backbone`: reuse an already loaded one instead
    (only when the folder has no adapter: merging would change it for every other user)."""
    from safetensors.torch import load_file
    from sieve.backbone import load_backbone

    from sieve.registry import resolve_backbone

    folder = resolve_reranker(str(name_or_path))
    cfg = RerankerConfig.load(folder)
    if backbone is not None and cfg.lora_r:
        raise ValueError(f"{folder.name} has a LoRA adapter; load it with its own backbone (backbone=None)")
    if backbone is None:
        backbone = load_backbone(resolve_backbone(cfg.backbone), home=home, device=device, dtype=dtype)
    if cfg.lora_r:
        merge_lora(backbone.model, load_file(str(folder / ADAPTER)), cfg.lora_alpha / cfg.lora_r)
    return reranker_from_config(backbone, cfg, name=folder.name)
