"""A REFRAG model folder: `refrag.json` + small safetensors beside it, and loading one into a `Refrag`.

    refrag.json             RefragConfig: backbone, chunk encoder, k, projector shape, policy shape, LoRA shape,
                            and the answer defaults (expansion, policy) for callers that do not set them
    projector.safetensors   the 2-layer MLP (fc1.weight/bias, fc2.weight/bias)
    policy.safetensors      optional learned expansion policy (PolicyScorer)
    adapter.safetensors     optional decoder LoRA (task tuning), merged at load into a private copy of the decoder
    encoder/                optional tuned chunk encoder (sentence-transformers folder; `encoder` = "encoder")
    train_log.json, README.md (the model card)

Shipped folders live in `refrag/models/<name>/` (package data): `refrag-k16` is the default.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from sieve.backbone.lora import lora_state, merge_lora  # noqa: F401 (re-exported)

from .policy import DEFAULT_EXPANSION, DEFAULT_POLICY
from .projector import PolicyScorer, Projector

CONFIG = "refrag.json"
PROJECTOR = "projector.safetensors"
POLICY = "policy.safetensors"
ADAPTER = "adapter.safetensors"
LORA_TARGETS = ["wqkv", "wo", "w13", "w2"]
DEFAULT = "refrag-k16"


@dataclass
class RefragConfig:
    backbone: str = "smollm2-135m-instruct"
    encoder: str = "all-minilm-l6-v2"
    k: int = 16
    encoder_dim: int = 384
    dim: int = 576  # the decoder's d_model
    projector_hidden: int = 2048
    policy_hidden: int = 64  # 0 or no policy.safetensors: no learned policy
    lora_r: int = 0  # 0: decoder untouched (shares the backbone with embed / rank)
    lora_alpha: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    layout: str = "v1"  # prompt.py's layouts; bump when they change
    expansion: float = DEFAULT_EXPANSION  # answers that do not set expansion / policy get these
    policy: str = DEFAULT_POLICY

    def save(self, folder: Path) -> None:
        (folder / CONFIG).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> RefragConfig:
        raw = json.loads((folder / CONFIG).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def packaged(name: str) -> Path:
    from importlib.resources import files

    return Path(str(files("sieve.refrag") / "models" / name))


def shipped() -> list[str]:
    root = packaged("")
    return sorted(p.name for p in root.iterdir() if (p / CONFIG).is_file()) if root.is_dir() else []


def resolve_refrag(name_or_path: str) -> Path:
    """A shipped model name (a folder under refrag/models) or a folder path."""
    if "/" not in name_or_path and (packaged(name_or_path) / CONFIG).is_file():
        return packaged(name_or_path)
    path = Path(name_or_path).expanduser()
    if not (path / CONFIG).is_file():
        raise FileNotFoundError(f"no REFRAG model at {path}: expected {CONFIG}; shipped: {', '.join(shipped())}")
    return path


def load_parts(folder: Path, cfg: RefragConfig, device: torch.device, out_rms: float = 0.1):
    """(projector, scorer or None) from a folder, on `device`, float32, frozen."""
    from safetensors.torch import load_file

    projector = Projector(cfg.encoder_dim, cfg.dim, cfg.projector_hidden, out_rms)
    projector.load_state_dict(load_file(str(folder / PROJECTOR)))
    scorer = None
    if cfg.policy_hidden and (folder / POLICY).is_file():
        scorer = PolicyScorer(cfg.encoder_dim, cfg.policy_hidden)
        scorer.load_state_dict(load_file(str(folder / POLICY)))
        scorer = scorer.to(device).eval().requires_grad_(False)
    return projector.to(device).eval().requires_grad_(False), scorer


def load_refrag(name_or_path: str | Path = DEFAULT, *, home: str | Path, device: str = "auto", dtype: str = "auto",
                backbone=None, encoder=None):
    """Load a REFRAG folder into a `Refrag`. `backbone`: reuse an already loaded one (a folder with a LoRA adapter
    merges it into a private copy of the decoder, so other users of the backbone are unaffected). `encoder`: reuse a
    loaded chunk encoder (ignored when the folder has its own tuned one)."""
    from safetensors.torch import load_file
    from sieve.backbone import load_backbone

    from sieve.registry import resolve_backbone

    from .encoder import load_chunk_encoder, model_encoder
    from .model import Refrag

    folder = resolve_refrag(str(name_or_path))
    cfg = RefragConfig.load(folder)
    if backbone is None:
        backbone = load_backbone(resolve_backbone(cfg.backbone), home=home, device=device, dtype=dtype)
    if backbone.args.dim != cfg.dim:
        raise ValueError(f"{folder.name} was trained for a {cfg.dim}-d decoder; this backbone is {backbone.args.dim}-d")
    model = backbone.model
    if cfg.lora_r:
        model = copy.deepcopy(model)
        merge_lora(model, load_file(str(folder / ADAPTER)), cfg.lora_alpha / cfg.lora_r)
    source, name = model_encoder(folder, cfg.encoder)
    if name is not None or encoder is None:
        encoder = load_chunk_encoder(source, device=str(backbone.device), name=name)
    projector, scorer = load_parts(folder, cfg, backbone.device)
    try:
        return Refrag(model, backbone.tokenizer, encoder, projector, k=cfg.k, scorer=scorer, name=folder.name,
                      expansion=cfg.expansion, policy=cfg.policy)
    except ValueError as e:
        raise ValueError(f"{folder / CONFIG}: {e}") from None
