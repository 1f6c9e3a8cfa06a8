"""Weight-only quantized matmul: int8 per output channel and int4 group-wise, y = x @ dequant(W)^T.

Formats (what `quantize_int8` / `quantize_int4` produce, and what the kernels read):

    int8  w_q [N, K] int8, scales [N] float32          w = w_q * scale            (symmetric)
    int4  w_q [N, Kp // 2] uint8, two values per byte:  low nibble = even k, high nibble = odd k,
          scales, zeros [N, Kp // G] float32            w = (q - 8) * scale + zero  (asymmetric, q in 0..15)

Kp is K rounded up to the group size G (padding columns quantize to 0 and meet x's masked zeros). The int4
convention is the one of torch's CPU `_weight_int4pack_mm_for_cpu` (and gpt-fast), so the CPU path can use it.

Each op has `<op>_reference` (plain torch: dequantize, then matmul in float32) and `<op>` (the Triton launcher,
same signature). Three regimes, accumulation always float32:

- GEMV (M <= 4, decode): no tensor cores. Each program streams a [BLOCK_N, BLOCK_K] tile of packed weights,
  multiplies by x's row and reduces along K; split-K so that every SM has work. int4 applies a tile's scale
  and zero once per output row: sum_k ((q - 8) s + z) x = s sum_k (q - 8) x + z sum_k x. Block sizes are
  autotuned per (N, K) on CUDA (the first call of a shape times a few configs).
- small batches (M <= 16): one 16-row `tl.dot` tile, split-K.
- GEMM (prefill): larger `tl.dot` tiles, no split.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

GEMV_MAX_M = 16  # up to here: one 16-row dot tile with split-K
VECTOR_MAX_M = 4  # up to here: the dot-free GEMV kernels
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------------- quantization


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (w_q [N, K] int8, scales [N] float32), symmetric per output channel."""
    w = w.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    w_q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return w_q, scales


def dequantize_int8(w_q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return w_q.float() * scales.float()[:, None]


def padded_k(k: int, group_size: int) -> int:
    return -(-k // group_size) * group_size


def quantize_int4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (w_q [N, Kp/2] uint8, scales [N, Kp/G], zeros [N, Kp/G]), asymmetric min/max per group."""
    n, k = w.shape
    kp = padded_k(k, group_size)
    w = torch.nn.functional.pad(w.float(), (0, kp - k)).view(n, kp // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scales = ((hi - lo) / 15.0).clamp(min=1e-10)
    zeros = lo + 8.0 * scales  # w = (q - 8) * scale + zero  <=>  q = (w - lo) / scale
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.uint8).view(n, kp)
    return pack_int4(q), scales, zeros


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, Kp] values 0..15 -> [N, Kp/2] uint8 (even k in the low nibble)."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(w_q: torch.Tensor) -> torch.Tensor:
    """[N, Kp/2] uint8 -> [N, Kp] uint8 values 0..15."""
    return torch.stack([w_q & 0xF, w_q >> 4], dim=-1).view(w_q.shape[0], -1)


def dequantize_int4(w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, k: int) -> torch.Tensor:
    """-> w [N, k] float32."""
    q = unpack_int4(w_q).float()
    n, kp = q.shape
    g = kp // scales.shape[1]
    w = (q.view(n, -1, g) - 8.0) * scales[..., None].float() + zeros[..., None].float()
    return w.view(n, kp)[:, :k]


# ------------------------------------------------------------------------------------------- references


def int8_matmul_reference(x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ (w_q * scales)^T -> [..., N] in x's dtype."""
    return (x.float() @ dequantize_int8(w_q, scales).t()).to(x.dtype)


def int4_matmul_reference(x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ dequant(w_q, scales, zeros)[:, :K]^T -> [..., N] in x's dtype."""
    return (x.float() @ dequantize_int4(w_q, scales, zeros, x.shape[-1]).t()).to(x.dtype)


# ---------------------------------------------------------------------------------------------- kernels


@triton.jit
def _int8_matmul_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_os, stride_om, stride_on,
    K_PER_SPLIT,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    # grid: (cdiv(M, BLOCK_M) * cdiv(N, BLOCK_N), SPLIT_K); program (pid, s) owns out[s, m-tile, n-tile]
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = split * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                    mask=(offs_n[None, :] < N) & k_ok[:, None], other=0)  # [BLOCK_K, BLOCK_N]
        if IEEE:
            acc += tl.dot(x, w.to(x.dtype), input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    scale = tl.load(s_ptr + offs_n, mask=offs_n < N, other=0.0)
    acc = acc * scale[None, :]
    out = out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _int4_matmul_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_os, stride_om, stride_on,
    K_PER_SPLIT,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):
    # BLOCK_K divides GROUP, so a K tile has one scale/zero per column n. x is read as its even and odd
    # columns, which meet the low and high nibbles of the packed bytes: no interleave in registers.
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, BLOCK_K // 2)  # byte index within the tile
    n_ok = offs_n < N
    k_start = split * K_PER_SPLIT
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        k_even = k0 + 2 * offs_h
        x_rows = x_ptr + offs_m[:, None] * stride_xm
        m_ok = offs_m[:, None] < M
        x_lo = tl.load(x_rows + k_even[None, :] * stride_xk, mask=m_ok & (k_even[None, :] < K), other=0.0)
        x_hi = tl.load(x_rows + (k_even[None, :] + 1) * stride_xk, mask=m_ok & (k_even[None, :] + 1 < K), other=0.0)
        byte = (k0 // 2 + offs_h)[:, None]
        packed = tl.load(w_ptr + offs_n[None, :] * stride_wn + byte * stride_wk,
                         mask=n_ok[None, :] & (2 * byte < K), other=0)  # [BLOCK_K/2, BLOCK_N] uint8
        g = k0 // GROUP
        g_ok = n_ok & ((offs_n * 0 + k0) < K)  # (a scalar condition broadcast: the interpreter wants a tensor)
        scale = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=g_ok, other=0.0)[None, :]
        zero = tl.load(z_ptr + offs_n * stride_sn + g * stride_sg, mask=g_ok, other=0.0)[None, :]
        w_lo = (((packed & 0xF).to(tl.float32) - 8.0) * scale + zero).to(x_lo.dtype)
        w_hi = (((packed >> 4).to(tl.float32) - 8.0) * scale + zero).to(x_lo.dtype)
        if IEEE:
            acc += tl.dot(x_lo, w_lo, input_precision="ieee")
            acc += tl.dot(x_hi, w_hi, input_precision="ieee")
        else:
            acc += tl.dot(x_lo, w_lo)
            acc += tl.dot(x_hi, w_hi)
    out = out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_ok[None, :])


@triton.jit
def _int8_gemv_kernel(
    x_ptr, w_ptr, s_ptr, out_ptr,
    N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_os, stride_om, stride_on,
    K_PER_SPLIT,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # grid: (cdiv(N, BLOCK_N), SPLIT_K, M); program (n-tile, s, row) owns out[s, row, n-tile]
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        k = k0 + offs_k
        k_ok = k < K
        x = tl.load(x_ptr + row * stride_xm + k * stride_xk, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs_n[:, None] * stride_wn + k[None, :] * stride_wk,
                    mask=n_ok[:, None] & k_ok[None, :], other=0)  # [BLOCK_N, BLOCK_K] int8
        acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    acc = acc * tl.load(s_ptr + offs_n, mask=n_ok, other=0.0)
    tl.store(out_ptr + split * stride_os + row * stride_om + offs_n * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_os, stride_om, stride_on,
    K_PER_SPLIT,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # BLOCK_K divides GROUP: one scale and zero per output row in a tile, applied after the reduction
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    offs_h = tl.arange(0, BLOCK_K // 2)  # byte index within the tile
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = split * K_PER_SPLIT
    x_row = x_ptr + row * stride_xm
    for k0 in range(k_start, k_start + K_PER_SPLIT, BLOCK_K):
        k_even = k0 + 2 * offs_h
        x_lo = tl.load(x_row + k_even * stride_xk, mask=k_even < K, other=0.0).to(tl.float32)
        x_hi = tl.load(x_row + (k_even + 1) * stride_xk, mask=k_even + 1 < K, other=0.0).to(tl.float32)
        byte = k0 // 2 + offs_h
        packed = tl.load(w_ptr + offs_n[:, None] * stride_wn + byte[None, :] * stride_wk,
                         mask=n_ok[:, None] & (2 * byte[None, :] < K), other=0)  # [BLOCK_N, BLOCK_K/2] uint8
        lo = (packed & 0xF).to(tl.float32) - 8.0
        hi = (packed >> 4).to(tl.float32) - 8.0
        dot = tl.sum(lo * x_lo[None, :] + hi * x_hi[None, :], axis=1)  # sum_k (q - 8) x, per row
        g = k0 // GROUP
        g_ok = n_ok & ((offs_n * 0 + k0) < K)
        scale = tl.load(s_ptr + offs_n * stride_sn + g * stride_sg, mask=g_ok, other=0.0)
        zero = tl.load(z_ptr + offs_n * stride_sn + g * stride_sg, mask=g_ok, other=0.0)
        acc += scale * dot + zero * (tl.sum(x_lo, axis=0) + tl.sum(x_hi, axis=0))
    tl.store(out_ptr + split * stride_os + row * stride_om + offs_n * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def _gemv_configs() -> list:
    return [triton.Config({"BLOCK_N": bn}, num_warps=w) for bn in (16, 32, 64) for w in (2, 4)]


# On CUDA the GEMV block sizes are autotuned per (N, K); the interpreter runs one fixed config.
_int8_gemv = _int8_gemv_kernel if INTERPRET else triton.autotune(_gemv_configs(), key=["N", "K"])(_int8_gemv_kernel)
_int4_gemv = _int4_gemv_kernel if INTERPRET else triton.autotune(_gemv_configs(), key=["N", "K"])(_int4_gemv_kernel)


# --------------------------------------------------------------------------------------------- launchers


@functools.cache
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _launch_config(m: int, n: int, k: int, block_k: int, device: torch.device) -> dict:
    """GEMV (m <= 16): 16-row tile, split-K until the grid has ~2 programs per SM. GEMM: bigger tiles."""
    if m <= GEMV_MAX_M:
        block_n = 64
        k_blocks = triton.cdiv(k, block_k)
        programs = triton.cdiv(n, block_n)
        split = max(1, min(k_blocks, triton.cdiv(2 * _sm_count(device), programs), 16))
        return dict(BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, split=split, num_warps=4)
    big = m >= 128 and n >= 128
    return dict(BLOCK_M=64 if big else 32, BLOCK_N=128 if big else 64, BLOCK_K=min(block_k, 64), split=1,
                num_warps=8 if big else 4)


def _split_k_partials(x: torch.Tensor, m: int, n: int, k: int, block_k: int, split: int) -> tuple[int, torch.Tensor]:
    """K per split (whole BLOCK_K tiles, so a tile never straddles two splits) and the per-split outputs
    [splits, m, n]: float32 partials when split, x's dtype when one program covers all of K."""
    per_split = triton.cdiv(triton.cdiv(k, block_k), split) * block_k
    splits = triton.cdiv(k, per_split)
    return per_split, torch.empty((splits, m, n), device=x.device, dtype=torch.float32 if splits > 1 else x.dtype)


def _sum_partials(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return out[0] if out.shape[0] == 1 else out.sum(0).to(dtype)


def _run(kernel, x: torch.Tensor, n: int, k: int, block_k: int, weights: tuple, weight_strides: tuple,
         extra_constexpr: dict) -> torch.Tensor:
    # (1) flatten leading dims, (2) pick GEMV/GEMM config, (3) allocate per-split partial outputs, (4) launch, sum
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    cfg = _launch_config(m, n, k, block_k, x.device)
    per_split, out = _split_k_partials(x, m, n, k, cfg["BLOCK_K"], cfg["split"])
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), out.shape[0])
    kernel[grid](
        x2, *weights, out, m, n, k, x2.stride(0), x2.stride(1), *weight_strides,
        out.stride(0), out.stride(1), out.stride(2), per_split,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        IEEE=x.dtype == torch.float32, num_warps=cfg["num_warps"], **extra_constexpr,
    )
    return _sum_partials(out, x.dtype).view(*lead, n)


def _run_gemv(kernel, x: torch.Tensor, n: int, k: int, block_k: int, weights: tuple, weight_strides: tuple,
              extra_constexpr: dict) -> torch.Tensor:
    # split-K so that ~4 programs per SM run (with BLOCK_N = 32, the middle of the tuned range); BLOCK_K divides
    # the int4 group, so a tile never straddles two groups either
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m == 0:
        return x.new_zeros(*lead, n)
    split = max(1, min(triton.cdiv(k, block_k), triton.cdiv(4 * _sm_count(x.device), triton.cdiv(n, 32) * m), 16))
    per_split, out = _split_k_partials(x, m, n, k, block_k, split)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_N"]), out.shape[0], m)

    fixed = {"BLOCK_N": 32, "num_warps": 4} if INTERPRET else {}
    kernel[grid](x2, *weights, out, n, k, x2.stride(0), x2.stride(1), *weight_strides,
                 out.stride(0), out.stride(1), out.stride(2), per_split, BLOCK_K=block_k, **extra_constexpr, **fixed)
    return _sum_partials(out, x.dtype).view(*lead, n)


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


def int8_matmul(x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Triton: same contract as `int8_matmul_reference`."""
    n, k = w_q.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={k}")
    if _rows(x) <= VECTOR_MAX_M:
        return _run_gemv(_int8_gemv, x, n, k, 128, (w_q, scales), (w_q.stride(0), w_q.stride(1)), {})
    return _run(_int8_matmul_kernel, x, n, k, 128, (w_q, scales), (w_q.stride(0), w_q.stride(1)), {})


def int4_matmul(x: torch.Tensor, w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """Triton: same contract as `int4_matmul_reference`."""
    n = w_q.shape[0]
    k = x.shape[-1]
    kp = 2 * w_q.shape[1]
    group = kp // scales.shape[1]
    if not (kp - group < k <= kp) or group not in (32, 64, 128, 256):
        raise ValueError(f"x has K={k}, packed weight holds {kp} columns in groups of {group}")
    if scales.stride() != zeros.stride():
        zeros = zeros.reshape(scales.shape).contiguous()
        scales = scales.contiguous()
    if _rows(x) <= VECTOR_MAX_M:
        return _run_gemv(_int4_gemv, x, n, k, min(group, 128), (w_q, scales, zeros),
                         (w_q.stride(0), w_q.stride(1), scales.stride(0), scales.stride(1)), {"GROUP": group})
    return _run(_int4_matmul_kernel, x, n, k, min(group, 128), (w_q, scales, zeros),
                (w_q.stride(0), w_q.stride(1), scales.stride(0), scales.stride(1)), {"GROUP": group})
