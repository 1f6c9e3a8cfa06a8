"""Weight-only quantization of the decoder's linears: `quantize(model, "int8" | "int4")`, gpt-fast style.

A scheme swaps every `nn.Linear` (through `swap_linears`) for a module that holds low-bit weights:

    int8  WeightOnlyInt8Linear: int8 [N, K] + float32 scale per output channel
    int4  Int4Linear: two 4-bit values per byte, group-wise scale and zero (asymmetric), groups of 32 columns
          by default; the LM head in int8 (`output_scheme`)

Why group 32 and an int8 head for int4: SmolLM2 ships as a Q4_1 GGUF, whose linears are already 4-bit in blocks
of 32 with a scale and a minimum, exactly this format; requantizing them with group 32 gives back the same
weights (no second rounding), while group 128 rounds them again. WikiText-2 test, 2 windows of 512 tokens, CPU:
fp32 26.68, int8 26.69, int4 g32 + int8 head 26.69, int4 g32 + int4 head 27.20, int4 g128 39.88. The GGUF's
embedding (the tied head) is Q8_0, which int8 keeps. `group_size=128` is there for other checkpoints.

Formats are those of `sieve.kernels.quant_matmul`. Which matmul runs depends on where the input lives and on
how many rows it has (M = tokens in the call):

    CUDA          Triton GEMV (M <= 16, split-K) or GEMM (prefill) from sieve.kernels
    CPU, M < 32   torch's own packed kernels, `_weight_int8pack_mm` / `_weight_int4pack_mm_for_cpu`, on bf16
                  activations (their fp32 path is a slow scalar loop: 3-40x slower than an fp32 matmul)
    CPU, M >= 32  a copy of the dequantized weight and a plain matmul, when `dense_prefill`: bfloat16 where
                  the CPU runs bf16 matmuls faster than fp32 (AVX512-BF16: 2-3x faster than fp32 and 1.5-2x
                  faster than the packed kernels for prefill), else float32 (`cpu_prefill_dtype`, measured
                  once); the copy is made on the first such call and costs 2 or 4 bytes per weight

Measured on 1 thread with bench/quant_cpu.py (bench/results/quant-cpu.json), e.g. the tied LM head 49152x576:
M=1 fp32 7.5 ms, int8 2.1 ms, int4 1.3 ms; M=512 fp32 373 ms, bf16 134 ms, int4 260 ms.
Dequantizing to fp32 on every call never won.

The output head is tied to the token embedding in SmolLM2; quantizing it (`include_output=True`) unties it:
the embedding keeps its float table for lookups and the head gets its own low-bit copy.
"""

from __future__ import annotations

import functools
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sieve.kernels.quant_matmul import (
    dequantize_int4,
    dequantize_int8,
    int4_matmul,
    int8_matmul,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

from .swap import swap_linears

SCHEMES = ("int8", "int4")
INT4_GROUP = 32  # see the module docstring: lossless requantization of Q4_1 weights
# CPU: rows per call from which the bf16 copy (when kept) beats torch's packed kernels; measured with
# bench/quant_cpu.py on the backbone's shapes, 1 thread: packed wins at M <= 16, bf16 at M >= 64.
CPU_DENSE_MIN_ROWS = 32
# candidates of a low-bit tied LM head rescored against the float embedding (Transformer.head)
EXACT_TOPK = 8


@functools.cache
def cpu_prefill_dtype() -> torch.dtype:
    """The dtype of the dequantized prefill copy: bfloat16 where this CPU multiplies it faster than float32
    (AVX512-BF16 with oneDNN: about 2x), else float32 (measured once per process on a backbone-sized matmul;
    on some CPUs that report AVX512-BF16, bf16 matmuls run at half the float32 speed)."""
    x, w = torch.randn(256, 576), torch.randn(1536, 576)

    def best(dtype: torch.dtype) -> float:
        xd, wd = x.to(dtype), w.to(dtype)
        F.linear(xd, wd)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            F.linear(xd, wd)
            times.append(time.perf_counter() - t0)
        return min(times)

    with torch.inference_mode():
        return torch.bfloat16 if best(torch.bfloat16) < 0.8 * best(torch.float32) else torch.float32


class _QuantLinear(nn.Module):
    """Shared dispatch: Triton on CUDA, torch packed kernel or kept float weights on CPU."""

    in_features: int
    out_features: int
    dense_prefill: bool

    def _packed_cpu(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _triton(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        raise NotImplementedError

    def prepare_cpu(self) -> None:
        """Build the CPU kernel's layout now rather than on the first call (before `torch.compile`)."""

    def cpu_path(self, rows: int) -> str:
        if self.dense_prefill and rows >= CPU_DENSE_MIN_ROWS:
            return "dense"
        return "packed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            y = self._triton(x)
        else:
            x2 = x.reshape(-1, self.in_features)
            if self.cpu_path(x2.shape[0]) == "dense":
                w = self._dense_weight()
                y = F.linear(x2.to(w.dtype), w).to(x.dtype)
            else:
                y = self._packed_cpu(x2)
            y = y.view(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            y = y + self.bias
        return y

    def _dense_weight(self) -> torch.Tensor:
        if self.dense is None:
            with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable in and out of inference mode
                self.dense = self.dequantized().to(cpu_prefill_dtype())
        return self.dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dense_prefill={self.dense_prefill}"


class WeightOnlyInt8Linear(_QuantLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, dense_prefill: bool = True,
                 device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.dense_prefill = in_features, out_features, dense_prefill
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None
        self.dense: torch.Tensor | None = None
        self._bf16_scales: torch.Tensor | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, dense_prefill: bool = True) -> WeightOnlyInt8Linear:
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, dense_prefill=dense_prefill,
                  device=w.device, dtype=w.dtype)
        w_q, scales = quantize_int8(w)
        mod.weight.copy_(w_q)
        mod.scales.copy_(scales)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def dequantized(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales)

    def _packed_cpu(self, x2: torch.Tensor) -> torch.Tensor:
        xb = x2.to(torch.bfloat16)  # torch's CPU kernel is vectorized for bf16 inputs only
        weight = self.weight
        pad_k = -self.in_features % 16  # and it needs K % 16 == 0 (else it crashes): zero columns meet zero inputs
        if pad_k:
            weight = F.pad(weight, (0, pad_k))
            xb = F.pad(xb, (0, pad_k))
        return torch._weight_int8pack_mm(xb.contiguous(), weight, self.bf16_scales()).to(x2.dtype)

    def bf16_scales(self) -> torch.Tensor:
        if self._bf16_scales is None:
            with torch.inference_mode(False), torch.no_grad():
                self._bf16_scales = self.scales.to(torch.bfloat16)
        return self._bf16_scales

    def prepare_cpu(self) -> None:
        self.bf16_scales()

    def _triton(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.weight, self.scales)


def int4_group_size(in_features: int, preferred: int = INT4_GROUP) -> int:
    """`preferred` if it divides K, else the largest of 64 / 32 below it that does (no padding), else `preferred`."""
    for g in (preferred, 64, 32):
        if g <= preferred and in_features % g == 0:
            return g
    return preferred


class Int4Linear(_QuantLinear):
    def __init__(self, in_features: int, out_features: int, bias: bool = False, *, group_size: int = 128,
                 dense_prefill: bool = True, device=None, dtype=torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.dense_prefill = in_features, out_features, dense_prefill
        self.group_size = group_size
        kp = -(-in_features // group_size) * group_size
        self.register_buffer("weight", torch.zeros(out_features, kp // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, kp // group_size, device=device))
        self.register_buffer("zeros", torch.zeros(out_features, kp // group_size, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype), requires_grad=False) \
            if bias else None
        self.dense: torch.Tensor | None = None
        self._cpu_pack: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, group_size: int = 128, dense_prefill: bool = True) -> Int4Linear:
        w = linear.weight.detach()
        mod = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size=group_size,
                  dense_prefill=dense_prefill, device=w.device, dtype=w.dtype)
        w_q, scales, zeros = quantize_int4(w, group_size)
        mod.weight.copy_(w_q)
        mod.scales.copy_(scales)
        mod.zeros.copy_(zeros)
        if linear.bias is not None:
            mod.bias.data.copy_(linear.bias.detach())
        return mod

    def dequantized(self) -> torch.Tensor:
        return dequantize_int4(self.weight, self.scales, self.zeros, self.in_features)

    def _triton(self, x: torch.Tensor) -> torch.Tensor:
        return int4_matmul(x, self.weight, self.scales, self.zeros)

    def cpu_pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        """torch's CPU layout: (packed weight, scales_and_zeros [Kp/G, Np, 2]); N padded to a multiple of 16."""
        if self._cpu_pack is None:
            with torch.inference_mode(False), torch.no_grad():
                self._cpu_pack = self._make_cpu_pack()
        return self._cpu_pack

    def _make_cpu_pack(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = unpack_int4(self.weight).to(torch.int32)
        sz = torch.stack([self.scales, self.zeros], dim=-1).transpose(0, 1)  # [Kp/G, N, 2]
        pad_n = -self.out_features % 16
        if pad_n:
            q = F.pad(q, (0, 0, 0, pad_n), value=8)
            sz = F.pad(sz, (0, 0, 0, pad_n))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        return packed, sz.to(torch.bfloat16).contiguous()

    def prepare_cpu(self) -> None:
        self.cpu_pack()

    def _packed_cpu(self, x2: torch.Tensor) -> torch.Tensor:
        packed, sz = self.cpu_pack()
        xb = x2.to(torch.bfloat16)  # torch's CPU kernel is vectorized for bf16 inputs only
        kp = 2 * self.weight.shape[1]
        if kp != self.in_features:
            xb = F.pad(xb, (0, kp - self.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), packed, self.group_size, sz)
        return y[:, : self.out_features].to(x2.dtype)


def quantize(model: nn.Module, scheme: str, *, include_output: bool = True, output_scheme: str | None = "int8",
             decode_output_scheme: str | None = "auto", group_size: int = INT4_GROUP,
             dense_prefill: bool = True) -> list[str]:
    """Swap the model's linears for `scheme`'s quantized modules in place; returns the swapped names.

    include_output: also quantize the LM head (`output`), untying it from the embedding.
    output_scheme: the head's scheme (default int8: near-lossless, and 3.5x faster than fp32 at decode on CPU);
        None: the same as `scheme`.
    decode_output_scheme: a second, decode-only LM head (`Transformer.decode_output`, used by `decode_step`):
        "int4" reads half the bytes per token of the int8 head (decode on CPU is bound by weight reads: the head
        is a quarter of them); its best candidates are rescored against the float embedding, so greedy choices
        match the float head's. "auto": int4 under the int4 scheme when the head is tied, else none. Prefill and
        `forward` (perplexity, first-token logits) keep `output_scheme`'s head.
    group_size: int4 columns per scale/zero (falls back to 64 / 32 where K is not a multiple).
    dense_prefill: on CPU, calls with many rows use a bf16 copy of each weight, made on first use (prefill
        speed for 2 bytes per weight); False keeps only the low-bit weights.
    """
    for s in (scheme, output_scheme or scheme):
        if s not in SCHEMES:
            raise ValueError(f"unknown quantization scheme {s!r}; known: {', '.join(SCHEMES)}")
    tied = include_output and bool(getattr(getattr(model, "args", None), "tie_embeddings", False))
    if decode_output_scheme == "auto":
        decode_output_scheme = "int4" if scheme == "int4" and tied and (output_scheme or scheme) != "int4" else None
    if decode_output_scheme is not None and (decode_output_scheme not in SCHEMES or not tied):
        raise ValueError(f"decode_output_scheme {decode_output_scheme!r}: int8 or int4, for a model whose head is "
                         "tied to its embedding")
    float_head = model.output if decode_output_scheme is not None else None

    def make(name: str, linear: nn.Linear) -> nn.Module | None:
        this = scheme
        if name == "output":
            if not include_output:
                return None
            this = output_scheme or scheme
        return make_module(this, linear)

    def make_module(this: str, linear: nn.Linear) -> nn.Module:
        if this == "int8":
            return WeightOnlyInt8Linear.from_linear(linear, dense_prefill=dense_prefill)
        g = int4_group_size(linear.in_features, group_size)
        return Int4Linear.from_linear(linear, group_size=g, dense_prefill=dense_prefill)

    with torch.no_grad():
        swapped = swap_linears(model, make)
    if swapped and hasattr(model, "args"):
        # read by `quant_summary`
        model.quant_scheme = scheme
        model.quant_output = (output_scheme or scheme) if "output" in swapped else "float (tied to the embedding)"
        if "output" in swapped and model.args.tie_embeddings:
            # the embedding keeps its float table: rescore the low-bit head's best candidates exactly
            model.exact_topk = EXACT_TOPK
    if float_head is not None:
        with torch.no_grad():
            model.decode_output = make_module(decode_output_scheme, float_head)
        model.quant_decode_output = decode_output_scheme
    return swapped


def quant_summary(model: nn.Module) -> dict:
    """What `sieve info` shows: scheme, how many linears, weight bytes, which matmul path each phase takes."""
    mods = [m for name, m in model.named_modules() if isinstance(m, _QuantLinear) and name != "decode_output"]
    if not mods:
        return {"scheme": "none"}
    decode_head = getattr(model, "decode_output", None)
    extra = [decode_head] if isinstance(decode_head, _QuantLinear) else []
    nbytes = sum(b.numel() * b.element_size() for m in mods + extra for b in m.buffers())
    device = mods[0].weight.device
    if device.type == "cuda":
        paths = {"decode": "triton GEMV (split-K)", "prefill": "triton GEMM"}
    else:
        op = "_weight_int8pack_mm" if isinstance(mods[0], WeightOnlyInt8Linear) else "_weight_int4pack_mm_for_cpu"
        dense = mods[0].dense_prefill
        paths = {"decode": f"torch {op} (bf16 activations)",
                 "prefill": f"{str(cpu_prefill_dtype()).removeprefix('torch.')} dequantized copy (rows >= "
                            f"{CPU_DENSE_MIN_ROWS})" if dense else f"torch {op}"}
    groups = sorted({m.group_size for m in mods if isinstance(m, Int4Linear)})
    return {"scheme": getattr(model, "quant_scheme", "mixed"), "lm_head": getattr(model, "quant_output", "?"),
            **({"int4_group_size": groups} if groups else {}), "linears": len(mods),
            **({"int8_channels": f"equalized, rms^{model.equalized_alpha}"}
               if getattr(model, "equalized_alpha", None) is not None else {}),
            "decode_lm_head": getattr(model, "quant_decode_output", None) or "the same head",
            "lm_head_exact_topk": getattr(model, "exact_topk", 0),
            "quantized_weight_mb": round(nbytes / 2**20, 1), **paths}
