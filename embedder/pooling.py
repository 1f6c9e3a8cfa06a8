"""Pool token states into one vector per text, over the tokens a pooling mask selects.

The pooling mask is the attention mask minus the instruction tokens: instructions are seen by attention but
never pooled. Shapes: hidden [B, T, D], pool_mask [B, T] (1 = pooled) -> [B, D].
"""

from __future__ import annotations

import torch

POOLING_MODES = ("mean", "last", "weighted_mean")


def pool(hidden: torch.Tensor, pool_mask: torch.Tensor, mode: str) -> torch.Tensor:
    m = pool_mask.to(hidden.dtype)
    if mode == "mean":
        return (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1)
    if mode == "last":  # the last pooled token (right padding: the last real token)
        positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
        last = torch.where(pool_mask.bool(), positions, -1).amax(1).clamp(min=0)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if mode == "weighted_mean":  # SGPT position weights: later tokens, which saw more, count more
        w = m.cumsum(1) * m
        return (hidden * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
    raise ValueError(f"unknown pooling {mode!r}; choose one of {', '.join(POOLING_MODES)}")
