"""Block-sparse attention for prefill: attend only over the (query block, key block) pairs a block mask allows.

    block_sparse_attention(q [B, H, Tq, D], k [B, Hkv, Tk, D], v [B, Hkv, Tk, D], block_mask [B, H, nQ, nK] bool,
                           *, causal, q_offset=0, key_padding=None, block_size=64, scale=None) -> [B, H, Tq, D]

Blocks are `block_size` x `block_size`: query block i covers queries [i*bs, (i+1)*bs) of this call, key block j
covers keys [j*bs, (j+1)*bs); the last ones may be short (odd lengths). Inside allowed blocks the usual masks still
apply: causal (key <= q_offset + query), key padding ([B, Tk] bool, True = real token; a query always sees its own
slot, as in the backbone's dense mask). A query row with no allowed key gets zeros, not NaN.

GQA: query head h reads K/V head h // (H // Hkv) in place, K/V are never repeated in memory.
`_block_sparse_attn_kernel` is a FlashAttention forward (online softmax, fp32 accumulators) whose inner loop walks
a per-(batch, head, query block) list of key blocks (`block_mask_to_index`), so skipped blocks cost nothing.
`block_sparse_attention_reference` is plain torch, chunked over query blocks so memory stays O(chunk x Tk).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


def expand_block_mask(block_mask: torch.Tensor, tq: int, tk: int, block_size: int) -> torch.Tensor:
    """[..., nQ, nK] -> [..., Tq, Tk] token-level mask."""
    m = block_mask.repeat_interleave(block_size, dim=-2)[..., :tq, :]
    return m.repeat_interleave(block_size, dim=-1)[..., :tk]


def token_mask(tq: int, tk: int, *, causal: bool, q_offset: int, key_padding: torch.Tensor | None,
               device) -> torch.Tensor:
    """[B or 1, 1, Tq, Tk] bool: causal and padding rules inside allowed blocks (the backbone's dense mask)."""
    q_idx = torch.arange(q_offset, q_offset + tq, device=device)[:, None]
    k_idx = torch.arange(tk, device=device)[None, :]
    allowed = (k_idx <= q_idx) if causal else torch.ones(tq, tk, dtype=torch.bool, device=device)
    allowed = allowed[None, None]
    if key_padding is not None:
        allowed = allowed & (key_padding[:, None, None, :].bool() | (k_idx == q_idx)[None, None])
    return allowed


def block_sparse_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, *, causal: bool, q_offset: int = 0,
    key_padding: torch.Tensor | None = None, block_size: int = 64, scale: float | None = None,
    chunk_blocks: int = 8,
) -> torch.Tensor:
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = h // hkv
    scale = d ** -0.5 if scale is None else scale
    kf, vf = k.float()[:, :, None], v.float()[:, :, None]  # [B, Hkv, 1, Tk, D]: broadcast over the group
    out = torch.empty_like(q)
    rows = chunk_blocks * block_size
    for start in range(0, tq, rows):
        end = min(tq, start + rows)
        qc = q[:, :, start:end].float().view(b, hkv, g, end - start, d)
        s = (qc @ kf.transpose(-1, -2)).view(b, h, end - start, tk) * scale
        allowed = token_mask(end - start, tk, causal=causal, q_offset=q_offset + start, key_padding=key_padding,
                             device=q.device)
        qb0 = start // block_size
        qb1 = -(-end // block_size)
        allowed = allowed & expand_block_mask(block_mask[:, :, qb0:qb1], qb1 * block_size - qb0 * block_size,
                                              tk, block_size)[:, :, : end - start]
        s = s.masked_fill(~allowed, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # empty rows: all -inf -> NaN -> 0
        o = p.view(b, hkv, g, end - start, tk) @ vf
        out[:, :, start:end] = o.view(b, h, end - start, d).to(q.dtype)
    return out


def block_mask_to_index(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, H, nQ, nK] bool -> (kv_index [B, H, nQ, max_count] int32, ascending, then padding; kv_count [B, H, nQ])."""
    count = block_mask.sum(-1, dtype=torch.int32)
    order = torch.sort((~block_mask).to(torch.int8), dim=-1, stable=True).indices  # allowed blocks first, in order
    width = max(1, int(count.max()))
    return order[..., :width].to(torch.int32).contiguous(), count.contiguous()


@triton.jit
def _block_sparse_attn_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, idx_ptr, cnt_ptr, pad_ptr,
    qk_scale, q_offset, Tq, Tk, H, GROUP,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_ib, stride_ih, stride_iq, stride_ik,
    stride_cb, stride_ch, stride_pb,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (number of query blocks, B * H); one program = one query block of one head
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP  # GQA: the shared K/V head, read in place
    offs_m = qb * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    q_pos = q_offset + offs_m
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], tl.float32)
    acc = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    idx_base = idx_ptr + b * stride_ib + h * stride_ih + qb * stride_iq
    count = tl.load(cnt_ptr + b * stride_cb + h * stride_ch + qb)
    for i in range(0, count):
        kb = tl.load(idx_base + i * stride_ik)
        offs_n = kb * BLOCK + tl.arange(0, BLOCK)
        n_ok = offs_n < Tk
        k = tl.load(k_base + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK]
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * qk_scale  # log2 domain
        allowed = n_ok[None, :] & m_ok[:, None]
        if CAUSAL:
            allowed = allowed & (offs_n[None, :] <= q_pos[:, None])
        if HAS_PAD:
            real = tl.load(pad_ptr + b * stride_pb + offs_n, mask=n_ok, other=0) != 0
            allowed = allowed & (real[None, :] | (offs_n[None, :] == q_pos[:, None]))
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet: avoid -inf - -inf
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK, BLOCK_D]
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # empty rows stay 0
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od,
             out.to(o_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def block_sparse_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, *, causal: bool, q_offset: int = 0,
    key_padding: torch.Tensor | None = None, block_size: int = 64, scale: float | None = None,
) -> torch.Tensor:
    """Triton: same contract as `block_sparse_attention_reference`."""
    # (1) check shapes, (2) turn the mask into per-row key-block lists, (3) allocate, (4) launch
    b, h, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    if h % hkv or k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not fit (GQA: H % Hkv == 0)")
    n_q, n_k = -(-tq // block_size), -(-tk // block_size)
    if block_mask.shape != (b, h, n_q, n_k):
        raise ValueError(f"block_mask is {tuple(block_mask.shape)}, expected {(b, h, n_q, n_k)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"block_size must be a power of two >= 16, got {block_size}")
    scale = d ** -0.5 if scale is None else scale
    index, count = block_mask_to_index(block_mask)
    out = torch.empty_like(q)
    pad = key_padding.to(torch.int8).contiguous() if key_padding is not None else count  # dummy pointer if unused
    _block_sparse_attn_kernel[(n_q, b * h)](
        q, k, v, out, index, count, pad,
        scale * LOG2E, q_offset, tq, tk, h, h // hkv,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *index.stride(), count.stride(0), count.stride(1),
        pad.stride(0),
        HEAD_DIM=d, BLOCK=block_size, BLOCK_D=max(16, triton.next_power_of_2(d)),
        CAUSAL=causal, HAS_PAD=key_padding is not None, IEEE=q.dtype == torch.float32,
        num_warps=4 if d <= 64 else 8, num_stages=2,
    )
    return out


def causal_block_mask(tq: int, tk: int, block_size: int, q_offset: int = 0, device=None) -> torch.Tensor:
    """[nQ, nK] bool: key blocks holding at least one key some query of the query block may see causally."""
    n_q, n_k = math.ceil(tq / block_size), math.ceil(tk / block_size)
    last_q = torch.clamp(torch.arange(1, n_q + 1, device=device) * block_size, max=tq) - 1 + q_offset
    first_k = torch.arange(n_k, device=device) * block_size
    return first_k[None, :] <= last_q[:, None]
