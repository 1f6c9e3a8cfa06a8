"""The `sparse` attention mode of the backbone: estimated block-sparse prefill, dense where sparsity cannot pay.

    SparseAttention(config)(q [B, H, Tq, D], k [B, Hkv, Tk, D], v, ctx) -> [B, H, Tq, D]

`ctx` is the backbone's `AttentionContext` (only `causal`, `q_offset`, `q_len`, `key_padding` are read), so this
module does not import the backbone. Short calls (keys < `min_length`, or fewer queries than two blocks: decode
steps, short chunks) run dense SDPA; long ones estimate a block mask per head (`sparse_pattern`) and run the
Triton kernel on CUDA or the torch reference elsewhere.

`register_sparse_attention()` adds the modes `sparse` (causal) and `sparse-bidirectional` to the backbone.
`sparse_by_default()` makes the plain `causal` / `bidirectional` modes sparse for a while, for callers that do
not pass a mode (generation's prefill): decode steps and short prompts still take the dense path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .block_sparse_attention import block_sparse_attention, block_sparse_attention_reference, causal_block_mask
from .sparse_pattern import SparseConfig, estimate_block_mask


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor:
    """SDPA with the backbone's mask rules (same as backbone.attention.sdpa_attention)."""
    gqa = q.shape[1] != k.shape[1]
    needs_mask = ctx.key_padding is not None or (ctx.causal and ctx.q_len > 1 and ctx.q_offset > 0)
    if needs_mask:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=ctx.causal and ctx.q_len > 1 and ctx.q_offset == 0,
                                          enable_gqa=gqa)


@dataclass
class SparseStats:
    """What the sparse path did, accumulated over calls (for evaluations and `sieve info`)."""

    dense_calls: int = 0
    sparse_calls: int = 0
    blocks_computed: int = 0  # (head, query block, key block) triples run
    blocks_causal: int = 0  # triples dense attention would run
    vertical_slash_heads: int = 0
    heads: int = 0

    @property
    def density(self) -> float:
        return self.blocks_computed / self.blocks_causal if self.blocks_causal else 1.0


@dataclass
class SparseAttention:
    config: SparseConfig = field(default_factory=SparseConfig)
    use_triton: bool | None = None  # None: Triton on CUDA tensors, the torch reference elsewhere
    stats: SparseStats = field(default_factory=SparseStats)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx) -> torch.Tensor:
        cfg = self.config
        tk = k.shape[2]
        if tk < cfg.min_length or q.shape[2] < 2 * cfg.block_size:
            self.stats.dense_calls += 1
            return dense_attention(q, k, v, ctx)
        mask, vs = estimate_block_mask(q, k, causal=ctx.causal, q_offset=ctx.q_offset, key_padding=ctx.key_padding,
                                       config=cfg)
        self._count(mask, vs, q.shape[2], tk, ctx)
        triton_ok = q.is_cuda if self.use_triton is None else self.use_triton
        attend = block_sparse_attention if triton_ok else block_sparse_attention_reference
        return attend(q, k, v, mask, causal=ctx.causal, q_offset=ctx.q_offset, key_padding=ctx.key_padding,
                      block_size=cfg.block_size)

    def _count(self, mask: torch.Tensor, vs: torch.Tensor, tq: int, tk: int, ctx) -> None:
        s = self.stats
        s.sparse_calls += 1
        s.blocks_computed += int(mask.sum())
        if ctx.causal:
            full = int(causal_block_mask(tq, tk, self.config.block_size, ctx.q_offset).sum())
        else:
            full = mask.shape[-2] * mask.shape[-1]
        s.blocks_causal += full * mask.shape[0] * mask.shape[1]
        s.vertical_slash_heads += int(vs.sum())
        s.heads += vs.numel()


def register_sparse_attention(config: SparseConfig | None = None) -> tuple[SparseAttention, SparseAttention]:
    """Register `sparse` (causal) and `sparse-bidirectional` with the backbone; returns the two callables."""
    from sieve.backbone.attention import register_attention_mode  # the backbone's hook (see its docstring)

    causal = SparseAttention(config or SparseConfig())
    bidirectional = SparseAttention(config or SparseConfig())
    register_attention_mode("sparse", causal, causal=True)
    register_attention_mode("sparse-bidirectional", bidirectional, causal=False)
    return causal, bidirectional


@contextmanager
def sparse_by_default(config: SparseConfig | None = None) -> Iterator[SparseAttention]:
    """Within the block, the backbone's `causal` and `bidirectional` modes run `SparseAttention` (restored after)."""
    from sieve.backbone.attention import ATTENTION_MODES, AttentionMode

    fn = SparseAttention(config or SparseConfig())
    saved = {name: ATTENTION_MODES[name] for name in ("causal", "bidirectional")}
    try:
        for name, mode in saved.items():
            ATTENTION_MODES[name] = AttentionMode(causal=mode.causal, fn=fn)
        yield fn
    finally:
        ATTENTION_MODES.update(saved)
