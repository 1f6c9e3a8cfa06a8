"""Run-time sparse pattern estimation, per head: which (query block, key block) pairs a prefill computes.

Two patterns, chosen per head from the input itself (FlexPrefill's decision rule):

- **query-aware block top-k**: mean-pool queries and keys per block, softmax the pooled scores over key blocks,
  and keep, for every query block, the fewest key blocks whose estimated attention mass reaches `gamma`.
- **vertical-slash** (MInference): attend with the last `last_q` queries for real; sum their attention per key
  column ("vertical" lines: sink-like tokens every query reads) and per diagonal offset ("slash" lines: fixed
  relative distances), keep the fewest columns and offsets reaching `gamma` of the mass each, and turn them into
  blocks (a column's key block for every query block; an offset's one or two diagonals of blocks).

The head takes block top-k when the pooled estimate for the last query block agrees with the real attention of
the last queries (Jensen-Shannon distance below `tau`), else vertical-slash. Sink blocks (the first keys) and
local blocks (the diagonal and the blocks just before it) are always kept. Bidirectional attention has no "last
queries", so it uses block top-k only.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .block_sparse_attention import causal_block_mask


@dataclass(frozen=True)
class SparseConfig:
    block_size: int = 64
    gamma: float = 0.95  # attention mass each pattern keeps (FlexPrefill's gamma)
    tau: float = 0.1  # JS distance under which a head trusts the pooled block estimate
    last_q: int = 64  # queries that attend for real to estimate vertical-slash lines
    sink_blocks: int = 1  # always-kept first key blocks
    local_blocks: int = 2  # always-kept diagonal blocks: the query's own block and the one before it
    # Calls whose key length is below this run dense SDPA: estimation and block bookkeeping only pay off on long
    # inputs. Measured on an H200 against SDPA (bench/kernels.py, 9/3 heads x 64, bf16): with the eager estimator
    # sparse loses at 32K (4.24 vs 2.79 ms) and wins at 64K (6.09 vs 10.30 ms), so dense stays below 64K; with the
    # compiled one the crossover is between 24K (1.77 vs 1.63 ms) and 32K (2.08 vs 2.74 ms). On a CPU the sparse
    # path is the torch reference, which never pays. Pass a smaller value to study the pattern on shorter inputs.
    min_length: int = 65536
    # torch.compile the estimator on CUDA: ~60 small ops, launch-bound in eager mode (H200, fixed shapes: 4.3 -> 0.9
    # ms at 8K, 2.7 -> 1.3 ms at 32K). Off by default: every new input length recompiles (a 100-passage rerank
    # took 12.7 s instead of 0.56 s), so it only pays for fixed lengths (bench/kernels.py --estimator compiled).
    compile: bool = False


def _pool_blocks(x: torch.Tensor, block_size: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """x [B, H, T, D] -> block means [B, H, nB, D] (the short last block divided by its own length)."""
    b, h, t, d = x.shape
    n = -(-t // block_size)
    xf = x.float() if valid is None else x.float() * valid[:, None, :, None]
    xf = F.pad(xf, (0, 0, 0, n * block_size - t)).view(b, h, n, block_size, d).sum(3)
    if valid is None:
        counts = torch.full((n,), float(block_size), device=x.device)
        counts[-1] = t - (n - 1) * block_size
        return xf / counts[:, None]
    counts = F.pad(valid.float(), (0, n * block_size - t)).view(valid.shape[0], n, block_size).sum(-1)
    return xf / counts.clamp(min=1)[:, None, :, None]


def _keep_mass(probs: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per row of probs [..., N]: the fewest entries whose sum reaches gamma (always at least the largest)."""
    total = probs.sum(-1, keepdim=True).clamp(min=1e-30)
    sorted_p, order = torch.sort(probs / total, dim=-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < gamma
    keep_sorted &= sorted_p > 0
    keep_sorted[..., 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def _js_distance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p = p / p.sum(-1, keepdim=True).clamp(min=1e-30)
    q = q / q.sum(-1, keepdim=True).clamp(min=1e-30)
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (a.clamp(min=1e-30).log() - b.clamp(min=1e-30).log()), 0.0).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(min=0).sqrt()


def estimate_block_mask(
    q: torch.Tensor, k: torch.Tensor, *, causal: bool, q_offset: int = 0, key_padding: torch.Tensor | None = None,
    config: SparseConfig = SparseConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, Tq, D], k [B, Hkv, Tk, D] -> (block_mask [B, H, nQ, nK] bool, vertical_slash [B, H] bool).

    vertical_slash tells, per head, which pattern was chosen (False: query-aware block top-k).
    On CUDA (with `config.compile`) this runs compiled; should compiling fail, it runs eagerly from then on.
    """
    global _compile_failed
    if q.is_cuda and config.compile and not _compile_failed:
        try:
            return _compiled()(q, k, causal=causal, q_offset=q_offset, key_padding=key_padding, config=config)
        except Exception as e:  # an inductor/triton failure must not take the prefill down
            _compile_failed = True
            logging.getLogger(__name__).warning("compiled sparse-pattern estimator failed (%s); running eagerly", e)
    return _estimate(q, k, causal=causal, q_offset=q_offset, key_padding=key_padding, config=config)


_compile_failed = False


@functools.cache
def _compiled():
    return torch.compile(_estimate)


def _estimate(q, k, *, causal, q_offset, key_padding, config):
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = h // hkv
    bs = config.block_size
    n_q, n_k = -(-tq // bs), -(-tk // bs)
    scale = d ** -0.5
    dev = q.device

    # which blocks may be attended at all
    if causal:
        valid = causal_block_mask(tq, tk, bs, q_offset, device=dev)[None, None]  # [1, 1, nQ, nK]
    else:
        valid = torch.ones(1, 1, n_q, n_k, dtype=torch.bool, device=dev)
    real_blocks = None
    if key_padding is not None:
        real_blocks = F.pad(key_padding.bool(), (0, n_k * bs - tk)).view(b, n_k, bs).any(-1)  # [B, nK]

    # query-aware estimate: pooled q . pooled k, softmax over the allowed key blocks
    qp = _pool_blocks(q, bs)  # [B, H, nQ, D]
    kp = _pool_blocks(k, bs, None if key_padding is None else key_padding.float())  # [B, Hkv, nK, D]
    est = (qp.view(b, hkv, g * n_q, d) @ kp.transpose(-1, -2)).view(b, h, n_q, n_k) * scale
    est_ok = valid if real_blocks is None else valid & real_blocks[:, None, None, :]
    est = torch.softmax(est.masked_fill(~est_ok, float("-inf")), -1).nan_to_num(0.0)
    mask = _keep_mass(est, config.gamma) & est_ok

    vertical_slash = torch.zeros(b, h, dtype=torch.bool, device=dev)
    if causal:
        vs_mask, attn_blocks = _vertical_slash(q, k, q_offset, key_padding, config)
        # agreement of the pooled estimate for the last query block with the last queries' real attention
        dist = _js_distance(attn_blocks, est[:, :, -1])
        vertical_slash = dist >= config.tau
        mask = torch.where(vertical_slash[..., None, None], vs_mask, mask)

    # always: sink blocks and local (diagonal) blocks
    q_block_abs = (q_offset + torch.arange(n_q, device=dev) * bs) // bs  # key-block index of each query block start
    q_block_end = (q_offset + torch.clamp(torch.arange(1, n_q + 1, device=dev) * bs, max=tq) - 1) // bs
    kb = torch.arange(n_k, device=dev)
    local = (kb[None, :] <= q_block_end[:, None]) & (kb[None, :] > q_block_abs[:, None] - config.local_blocks)
    if not causal:  # bidirectional: the blocks just after the diagonal too
        after = kb[None, :] - q_block_end[:, None]
        local = local | ((after > 0) & (after < config.local_blocks))
    sink = (kb < config.sink_blocks)[None, :]
    mask = (mask | local | sink) & valid
    return mask, vertical_slash


def _vertical_slash(q, k, q_offset, key_padding, config):
    """-> (block mask from vertical + slash lines [B, H, nQ, nK], last queries' attention per key block [B, H, nK])."""
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = h // hkv
    bs = config.block_size
    n_q, n_k = -(-tq // bs), -(-tk // bs)
    dev = q.device
    nl = min(config.last_q, tq)
    q_last = q[:, :, tq - nl:].float().reshape(b, hkv, g * nl, d)
    s = (q_last @ k.float().transpose(-1, -2)).view(b, h, nl, tk) * d ** -0.5
    q_pos = q_offset + tq - nl + torch.arange(nl, device=dev)  # absolute positions of the last queries
    k_idx = torch.arange(tk, device=dev)
    allowed = (k_idx[None, :] <= q_pos[:, None])[None, None]
    if key_padding is not None:
        allowed = allowed & (key_padding.bool()[:, None, None, :] | (k_idx[None, :] == q_pos[:, None]))
    attn = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1).nan_to_num(0.0)  # [B, H, nl, Tk]

    vertical = attn.sum(2)  # [B, H, Tk]
    offset = (q_pos[:, None] - k_idx[None, :]).clamp(0, tk - 1)  # [nl, Tk]; masked entries carry zero mass
    slash = torch.zeros(b, h, tk, device=dev).scatter_add_(
        -1, offset.reshape(1, 1, -1).expand(b, h, -1), attn.reshape(b, h, -1))
    keep_v = _keep_mass(vertical, config.gamma)  # [B, H, Tk] columns
    keep_s = _keep_mass(slash, config.gamma)  # [B, H, Tk] offsets

    col_blocks = F.pad(keep_v, (0, n_k * bs - tk)).view(b, h, n_k, bs).any(-1)  # [B, H, nK]
    # offset o = c*bs + e reaches key blocks at block distance c (and c+1 when e > 0) from the query block;
    # with a query start not on a block boundary, also c-1 and c+1 (conservative)
    o = torch.arange(tk, device=dev)
    c, e = o // bs, o % bs
    dist = torch.zeros(b, h, n_k + 2, dtype=torch.uint8, device=dev)  # selected block distances 0..nK+1

    def mark(distance: torch.Tensor, selected: torch.Tensor) -> None:
        idx = distance.clamp(0, n_k + 1).expand(b, h, -1)
        dist.scatter_reduce_(-1, idx, selected.to(torch.uint8), "amax")

    if q_offset % bs == 0:
        mark(c, keep_s)
        mark(c + 1, keep_s & (e > 0))
    else:
        for shift in (-1, 0, 1):
            mark(c + shift, keep_s)
    dist = dist.bool()
    q_block_abs = (q_offset + torch.arange(n_q, device=dev) * bs) // bs
    block_dist = q_block_abs[:, None] - torch.arange(n_k, device=dev)[None, :]  # [nQ, nK]
    in_range = (block_dist >= 0) & (block_dist <= n_k + 1)
    diag = dist.gather(-1, block_dist.clamp(0, n_k + 1).reshape(1, 1, -1).expand(b, h, -1)).view(b, h, n_q, n_k)
    mask = (diag & in_range) | col_blocks[:, :, None, :]

    attn_blocks = F.pad(attn.sum(2), (0, n_k * bs - tk)).view(b, h, n_k, bs).sum(-1)  # [B, H, nK]
    return mask, attn_blocks
