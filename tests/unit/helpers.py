"""Tiny random-weight models for unit tests: built in milliseconds, no download."""

from __future__ import annotations

import torch
from sieve.backbone import ModelArgs, Transformer


def tiny_model(preset: str = "tiny", dtype=torch.float32, **overrides) -> Transformer:
    args = ModelArgs.from_name(preset)
    for k, v in overrides.items():
        setattr(args, k, v)
    torch.manual_seed(0)
    model = Transformer(args)
    with torch.no_grad():  # norms away from 1 so a missing/ misplaced norm shows up
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 2:
                p.normal_(0, 0.08)
            else:
                p.normal_(0, 0.05)
    return model.to(dtype).eval().requires_grad_(False)


def random_ids(batch: int, length: int, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)
