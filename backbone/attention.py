"""Attention modes, chosen per forward call, and the hook through which kernels plug in other implementations.

A mode is a name bound to an `AttentionMode(causal, fn)`. Built in: `causal` and `bidirectional`, both on
torch SDPA. `register_attention_mode("sparse", fn, causal=True)` is how `sieve.kernels` adds a block-sparse
prefill without the decoder knowing about it. Every implementation gets the same inputs:

    fn(q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, D], ctx: AttentionContext) -> [B, H, Tq, D]

K/V keep their Hkv heads (GQA is the implementation's job, no repeat in memory needed). `ctx` describes the
mask structurally (causal flag, query offset into the keys, key padding) and builds a dense boolean mask on
demand, once per forward, shared by all layers.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, "AttentionContext"], torch.Tensor]


@dataclass
class AttentionContext:
    causal: bool
    q_len: int  # Tq
    q_offset: int  # key index of the first query (the KV-cache fill before this call)
    key_padding: torch.Tensor | None  # [B, Tk] bool, True = real token; None = no padding anywhere
    use_cache: bool = False  # K/V of this call are written to (and keys read from) the KV cache
    device: torch.device | None = None  # where `mask` is built (the activations' device; key_padding's if None)

    @property
    def k_len(self) -> int:
        return self.q_offset + self.q_len

    @property
    def needs_mask(self) -> bool:
        """False when SDPA's own flags express the mask (no padding, and causal only in its aligned form)."""
        if self.key_padding is not None:
            return True
        return self.causal and self.q_len > 1 and self.q_offset > 0

    @property
    def sdpa_is_causal(self) -> bool:
        return self.causal and self.q_len > 1 and self.q_offset == 0

    @functools.cached_property
    def mask(self) -> torch.Tensor:
        """Dense [B or 1, 1, Tq, Tk] bool mask, True = may attend.

        A query always sees its own slot, so rows of padding queries are never empty (no NaN from softmax);
        their outputs are meaningless and ignored, real tokens never see padding keys.
        """
        device = self.key_padding.device if self.key_padding is not None else self.device
        q_idx = torch.arange(self.q_offset, self.k_len, device=device)[:, None]
        k_idx = torch.arange(self.k_len, device=device)[None, :]
        allowed = (k_idx <= q_idx) if self.causal else (k_idx >= 0).expand(self.q_len, -1)
        allowed = allowed[None, None]  # [1, 1, Tq, Tk]
        if self.key_padding is not None:
            allowed = allowed & self.key_padding[:, None, None, :]
        return allowed | (k_idx == q_idx)[None, None]


# A few query rows against a long cache on the CPU (decoding with forced tokens, a speculative draft): SDPA's CPU
# kernel costs more than two matmuls there (bfloat16, 8,192 keys, 9/3 heads, 30 layers, 2 AMD EPYC threads: 1 row
# 103 vs 7 ms, 5 rows 40 vs 15 ms, 12 rows 59 vs 98 ms), so up to SHORT_QUERY rows take the matmul path.
SHORT_QUERY = 8
LONG_KEYS = 1024


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    if q.device.type == "cpu" and q.shape[2] <= SHORT_QUERY and k.shape[2] >= LONG_KEYS:
        return matmul_attention(q, k, v, ctx.mask if ctx.needs_mask else None)
    if ctx.needs_mask:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=ctx.sdpa_is_causal, enable_gqa=gqa)


def matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Attention as two matmuls with a float32 softmax; query head h reads K/V head h // group (no K/V repeat).
    q [B, H, T, D], k/v [B, Hkv, K, D], mask [B or 1, 1, T, K] bool (True = may attend) or None -> [B, H, T, D]."""
    b, h, t, d = q.shape
    hkv, keys = k.shape[1], k.shape[2]
    g = h // hkv
    scores = (q.reshape(b, hkv, g * t, d) @ k.transpose(-1, -2)).float().view(b, hkv, g, t, keys) * d ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    probs = scores.softmax(-1).to(v.dtype).view(b, hkv, g * t, keys)
    return (probs @ v).view(b, h, t, d)


@dataclass(frozen=True)
class AttentionMode:
    causal: bool
    fn: AttentionFn


ATTENTION_MODES: dict[str, AttentionMode] = {
    "causal": AttentionMode(causal=True, fn=sdpa_attention),
    "bidirectional": AttentionMode(causal=False, fn=sdpa_attention),
}


def register_attention_mode(name: str, fn: AttentionFn, *, causal: bool) -> None:
    """Make `mode=name` available to every forward call (e.g. a Triton block-sparse prefill)."""
    ATTENTION_MODES[name] = AttentionMode(causal=causal, fn=fn)


def get_attention_mode(name: str) -> AttentionMode:
    try:
        return ATTENTION_MODES[name]
    except KeyError:
        raise ValueError(f"unknown attention mode {name!r}; available: {', '.join(ATTENTION_MODES)}") from None
