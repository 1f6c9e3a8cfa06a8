"""Kernel speed, paired in one run: sparse vs dense attention prefill, int8/int4 weight-only matmul vs bf16.

Attention (synthetic Q/K/V with the backbone's head shapes: 9 query heads, 3 KV heads, head_dim 64, causal):
    dense   torch SDPA (FlashAttention backend on CUDA)
    sparse  pattern estimation + block-sparse Triton kernel (the `sparse` attention mode, forced on)
    plus the estimation alone and the block density it chose. Synthetic inputs carry a sink, local attention and
    a few vertical lines so the estimator has structure to find (random Q/K would look dense).
Matmul (y = x @ W^T, bf16 activations):
    torch-matmul  torch.matmul with bf16 weights (float32 on the CPU smoke run)
    int8    Triton int8 GEMV/GEMM; int4: Triton int4 (group 128; 64 where K is 576)
    for the backbone's linears and a 4096x4096 / 14336x4096 (up) / 4096x14336 (down) layer, M = 1, 4, 16, 64.
    On CUDA `us` is GPU time per call from CUDA-graph replays (a decode step is graph-captured; a tiny GEMV's
    host launch costs more than the kernel) and `eager_us` the per-call time with launch and sync included.

On GPU:   python bench/kernel_speed.py --device cuda                 (8K, 32K, 64K, 128K; writes kernels-cuda.json)
On CPU:   python bench/kernel_speed.py                               (tiny sizes, torch reference paths: a smoke run)
Crossover for SparseConfig.min_length: add --lengths 8192,16384,24576,32768,65536 (and --estimator compiled).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import cuda_graph_seconds, device_name, timeit_paired, write_results  # noqa: E402
from sieve.kernels import (  # noqa: E402
    block_sparse_attention,
    block_sparse_attention_reference,
    estimate_block_mask,
    int4_matmul,
    int4_matmul_reference,
    int8_matmul,
    int8_matmul_reference,
    quantize_int4,
    quantize_int8,
)
from sieve.kernels.block_sparse_attention import causal_block_mask  # noqa: E402
from sieve.kernels.sparse_pattern import SparseConfig  # noqa: E402

BACKBONE_LINEARS = [("wqkv", 960, 576), ("wo", 576, 576), ("w13", 3072, 576), ("w2", 576, 1536),
                    ("lm_head", 49152, 576)]
BIG_LINEARS = [("4096x4096", 4096, 4096), ("up 14336x4096", 14336, 4096), ("down 4096x14336", 4096, 14336)]


def synthetic_qkv(t: int, device, dtype, h: int = 9, hkv: int = 3, d: int = 64, seed: int = 0):
    """Q/K/V with attention structure: a sink token, strong locality (RoPE-like), and a few heavy columns."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(1, h, t, d, generator=g)
    k = torch.randn(1, hkv, t, d, generator=g)
    pos = torch.arange(t)[:, None] * (1.0 / (10000 ** (torch.arange(d // 2) / (d // 2))))[None]
    rot = torch.cat([pos.cos(), pos.sin()], -1)  # shared positional component: nearby tokens align
    q = q + 2.0 * rot
    k = k + 2.0 * rot
    k[:, :, 0] += 4.0 * q.mean((1, 2))[:, None]  # sink
    heavy = torch.randint(1, t, (8,), generator=g)
    k[:, :, heavy] += 3.0 * q.mean((1, 2))[:, None, None]
    v = torch.randn(1, hkv, t, d, generator=g)
    return [x.to(device=device, dtype=dtype) for x in (q, k, v)]


def bench_attention(lengths: list[int], device: torch.device, dtype, sync, repeat: int, cfg: SparseConfig,
                    dev_name: str) -> list[dict]:
    rows = []
    for t in lengths:
        rows += _attention_at(t, device, dtype, sync, repeat, cfg, dev_name)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _attention_at(t: int, device, dtype, sync, repeat: int, cfg: SparseConfig, dev_name: str) -> list[dict]:
    q, k, v = synthetic_qkv(t, device, dtype)
    mask, vs = estimate_block_mask(q, k, causal=True, config=cfg)
    density = (mask.sum() / (mask.shape[1] * causal_block_mask(t, t, cfg.block_size).sum())).item()
    attend = block_sparse_attention if device.type == "cuda" else block_sparse_attention_reference

    def sparse():
        m, _ = estimate_block_mask(q, k, causal=True, config=cfg)
        return attend(q, k, v, m, causal=True, block_size=cfg.block_size)

    runs = {
        "dense-sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
        "sparse": sparse,
        "sparse-kernel-only": lambda: attend(q, k, v, mask, causal=True, block_size=cfg.block_size),
        "estimate-only": lambda: estimate_block_mask(q, k, causal=True, config=cfg),
    }
    times = timeit_paired(runs, repeat=repeat, sync=sync)
    err = None
    if t <= 16384:  # the float32 dense reference still fits
        want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True, enable_gqa=True)
        err = (sparse().float() - want).abs().max().item()
    rows = []
    for system, s in times.items():
        row = {"system": system, "op": "attention-prefill", "tokens": t, "heads": "9q/3kv x 64",
               "dtype": str(dtype).removeprefix("torch."), "device": dev_name, "ms": round(s * 1e3, 3),
               "speedup_vs_dense": round(times["dense-sdpa"] / s, 2)}
        if system.startswith("sparse"):
            row["block_density"] = round(density, 4)
            row["vertical_slash_heads"] = int(vs.sum())
            row["estimator"] = "torch.compile" if cfg.compile and device.type == "cuda" else "eager"
            if err is not None and system == "sparse":
                row["max_abs_diff_vs_dense"] = round(err, 4)
        rows.append(row)
    print(f"attention T={t:6d}: " + "  ".join(f"{n}={s * 1e3:.2f}ms" for n, s in times.items())
          + f"  density={density:.3f}", flush=True)
    return rows


def bench_matmul(shapes, batches: list[int], device: torch.device, dtype, sync, repeat: int,
                 dev_name: str) -> list[dict]:
    rows = []
    for layer, n, k in shapes:
        rows += _matmul_layer(layer, n, k, batches, device, dtype, sync, repeat, dev_name)
    return rows


def _matmul_layer(layer: str, n: int, k: int, batches: list[int], device, dtype, sync, repeat: int,
                  dev_name: str) -> list[dict]:
    cuda = device.type == "cuda"
    i8 = int8_matmul if cuda else int8_matmul_reference
    i4 = int4_matmul if cuda else int4_matmul_reference
    w = torch.randn(n, k) * 0.02
    group = 128 if k % 128 == 0 else 64
    w8, s8 = (t.to(device) for t in quantize_int8(w))
    w4, s4, z4 = (t.to(device) for t in quantize_int4(w, group))
    wd = w.to(device=device, dtype=dtype)
    bytes_per_weight = {"torch-matmul": 2, "int8": 1, "int4": 0.5}
    rows = []
    for m in batches:
        x = torch.randn(m, k, device=device, dtype=dtype)
        runs = {
            "torch-matmul": lambda x=x: torch.matmul(x, wd.t()),
            "int8": lambda x=x: i8(x, w8, s8),
            "int4": lambda x=x: i4(x, w4, s4, z4),
        }
        eager = timeit_paired(runs, repeat=repeat, sync=sync)
        times = cuda_graph_seconds(runs) if cuda else eager
        ref = x.float() @ wd.float().t()
        for system, s in times.items():
            row = {"system": system, "op": "gemv" if m <= 16 else "gemm", "layer": layer, "n": n, "k": k, "m": m,
                   "device": dev_name, "dtype": str(dtype).removeprefix("torch."), "us": round(s * 1e6, 2),
                   "timing": "cuda-graph replay" if cuda else "per call",
                   "speedup_vs_torch": round(times["torch-matmul"] / s, 2),
                   "weight_gb_per_s": round(n * k * bytes_per_weight[system] / s / 1e9, 1)}
            if cuda:
                row["eager_us"] = round(eager[system] * 1e6, 2)
            if system != "torch-matmul":
                y = runs[system]().float()
                row["rel_err_vs_torch"] = round(((y - ref).norm() / ref.norm()).item(), 4)
            rows.append(row)
        print(f"matmul {layer:16s} M={m:3d}: " + "  ".join(f"{n_}={s * 1e6:.1f}us" for n_, s in times.items()),
              flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--lengths", default=None, help="attention lengths (default: 8K..128K on CUDA, 512,1024 on CPU)")
    ap.add_argument("--batches", default="1,4,16,64")
    ap.add_argument("--gamma", type=float, default=SparseConfig.gamma)
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the machine is shared: 1 by default)")
    ap.add_argument("--skip", default="", help="attention and/or matmul")
    ap.add_argument("--estimator", choices=("eager", "compiled"), default="eager",
                    help="the sparse-pattern estimator eager or through torch.compile (SparseConfig.compile)")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    dev_name = device_name(args.device)
    repeat = args.repeat or (10 if cuda else 3)
    default_lengths = "8192,32768,65536,131072" if cuda else "512,1024"
    lengths = [int(x) for x in (args.lengths or default_lengths).split(",")]
    cfg = SparseConfig(gamma=args.gamma, min_length=0, compile=args.estimator == "compiled")
    rows: list[dict] = []
    if "attention" not in args.skip:
        rows += bench_attention(lengths, device, dtype, sync, repeat, cfg, dev_name)
    if "matmul" not in args.skip:
        shapes = BACKBONE_LINEARS + (BIG_LINEARS if cuda else [])
        batches = [int(b) for b in args.batches.split(",")]
        rows += bench_matmul(shapes if cuda else shapes[:4], batches, device, dtype, sync, repeat, dev_name)
    name = args.name or ("kernels-cuda" if cuda else "kernels-cpu-smoke")
    out = write_results(name, rows, dev_name + ("" if cuda else f", torch.set_num_threads({args.threads})"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
