"""An embedder model folder: `embedder.json` + small safetensors beside it, and loading one into an `Embedder`.

    embedder.json            EmbedderConfig: backbone, pooling, max length, instructions, LoRA shape, projection
    adapter.safetensors      LoRA A/B per target linear (`layers.3.attention.wqkv.lora_A` ...), merged at load
    projection.safetensors   optional `weight` [out, in] (+ `bias`) applied after pooling
    calibration.safetensors  optional `embeddings` [n, dim] raw pooled vectors for int8 ranges
    README.md                the model card

A folder with `modules.json` instead is a sentence-transformers model and is served through the same API.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from sieve.backbone import load_backbone
from sieve.backbone.lora import merge_lora  # noqa: F401 (re-exported)
from sieve.backbone.packed import pack_linears

from sieve.registry import resolve_backbone

from .embedder import Embedder
from .encoders import LLMEncoder, SentenceTransformerEncoder

CONFIG = "embedder.json"
ADAPTER = "adapter.safetensors"
PROJECTION = "projection.safetensors"
CALIBRATION = "calibration.safetensors"
LORA_TARGETS = ["wqkv", "wo", "w13", "w2"]


@dataclass
class EmbedderConfig:
    backbone: str = "smollm2-135m-instruct"
    pooling: str = "mean"
    max_length: int = 512
    query_instruction: str = ""
    document_instruction: str = ""
    lora_r: int = 0  # 0: no adapter
    lora_alpha: float = 0.0
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    projection_dim: int = 0  # 0: no projection

    def save(self, folder: Path) -> None:
        (folder / CONFIG).write_text(json.dumps(dataclasses.asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> EmbedderConfig:
        raw = json.loads((folder / CONFIG).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})


def is_sentence_transformers(folder: Path) -> bool:
    """A sentence-transformers model folder (and not a Sieve embedder folder)."""
    return (folder / "modules.json").is_file() and not (folder / CONFIG).is_file()


def load_embedder(folder: str | Path, *, home: str | Path, device: str = "auto", dtype: str = "auto",
                  pack: bool = True) -> Embedder:
    """Load an embedder folder (Sieve LLM embedder or sentence-transformers model). pack: run the LLM encoder's
    linears on oneDNN-prepacked weights where it can (CPU, float32; see backbone/packed.py): inference only."""
    from safetensors.torch import load_file
    from sieve.backbone.loader import resolve_device, resolve_dtype

    folder = Path(folder).expanduser()
    if is_sentence_transformers(folder):
        dev = resolve_device(device)
        encoder = SentenceTransformerEncoder(folder, device=dev, dtype=resolve_dtype(dtype, dev))
        return Embedder(encoder)
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"no embedder at {folder}: expected {CONFIG} (Sieve) or modules.json "
                                "(sentence-transformers)")
    cfg = EmbedderConfig.load(folder)
    backbone = load_backbone(resolve_backbone(cfg.backbone), home=home, device=device, dtype=dtype)
    if cfg.lora_r:
        merge_lora(backbone.model, load_file(str(folder / ADAPTER)), cfg.lora_alpha / cfg.lora_r)
    if pack:
        pack_linears(backbone.model)  # after the merge: the packed weights are the adapted ones
    projection = None
    if cfg.projection_dim:
        sd = load_file(str(folder / PROJECTION))
        projection = nn.Linear(backbone.args.dim, cfg.projection_dim, bias="bias" in sd)
        projection.load_state_dict(sd)
        projection = projection.to(device=backbone.device).eval().requires_grad_(False)
    calibration = None
    if (folder / CALIBRATION).is_file():
        calibration = load_file(str(folder / CALIBRATION))["embeddings"].float().numpy()
    encoder = LLMEncoder(backbone, name=folder.name, max_length=cfg.max_length, projection=projection,
                         default_pooling=cfg.pooling)
    return Embedder(encoder, query_instruction=cfg.query_instruction,
                    document_instruction=cfg.document_instruction, calibration=calibration)


def save_calibration(folder: Path, embeddings: np.ndarray) -> None:
    from safetensors.torch import save_file

    save_file({"embeddings": torch.from_numpy(embeddings.astype(np.float16))}, str(folder / CALIBRATION))
