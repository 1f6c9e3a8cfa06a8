"""CPU matmul paths for weight-only quantized linears, on the backbone's shapes: which one to run when.

For each layer shape (N x K) and row count M (1, 4, 16 decode; 64, 512 prefill) it times, paired in one run:

    fp32          F.linear with float32 weights and activations (the unquantized model)
    bf16          F.linear with bfloat16 weights and activations (a kept dequantized copy)
    int8-packed   torch._weight_int8pack_mm, bf16 activations (fp32/fp16 activations take a slow scalar path:
                  3-40x slower than fp32 F.linear, measured, so the modules cast to bf16 around the call)
    int4-packed   torch.ops.aten._weight_int4pack_mm_for_cpu, bf16 activations (weights from
                  _convert_weight_to_int4pack_for_cpu)
    int8-dequant  dequantize the int8 weight to fp32 per call, then F.linear

and writes bench/results/quant-cpu.json. Run it on 1 thread when the machine is shared (the default):

    python bench/quant_cpu.py [--threads 1] [--rows 1,4,16,64,512] [--repeat 7]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import device_name, timeit_paired, write_results  # noqa: E402
from sieve.backbone.quant import Int4Linear, WeightOnlyInt8Linear, int4_group_size  # noqa: E402

# (name, N out, K in) of SmolLM2-135M: fused qkv, attention out, fused gate+up, down, tied LM head
SHAPES = [("wqkv", 960, 576), ("wo", 576, 576), ("w13", 3072, 576), ("w2", 576, 1536), ("lm_head", 49152, 576)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,4,16,64,512")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    ap.add_argument("--name", default="quant-cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows: list[dict] = []
    wanted = set(args.shapes.split(","))
    with torch.inference_mode():
        for layer, n, k in (s for s in SHAPES if s[0] in wanted):
            lin = nn.Linear(k, n, bias=False)
            q8 = WeightOnlyInt8Linear.from_linear(lin)
            q4 = Int4Linear.from_linear(lin, group_size=int4_group_size(k))
            q4.cpu_pack()
            w_bf16 = lin.weight.bfloat16()
            for m in map(int, args.rows.split(",")):
                x = torch.randn(m, k)
                runs = {
                    "fp32": lambda x=x, w=lin.weight: F.linear(x, w),
                    "bf16": lambda x=x, w=w_bf16: F.linear(x.bfloat16(), w).float(),
                    "int8-packed": lambda x=x, mod=q8: mod._packed_cpu(x),
                    "int4-packed": lambda x=x, mod=q4: mod._packed_cpu(x),
                    "int8-dequant": lambda x=x, mod=q8: F.linear(x, mod.dequantized()),
                }
                repeat = args.repeat if n * k * m < 2e8 else 3
                times = timeit_paired(runs, repeat=repeat)
                for system, s in times.items():
                    rows.append({"system": system, "layer": layer, "n": n, "k": k, "m": m, "threads": args.threads,
                                 "us": round(s * 1e6, 1), "speedup_vs_fp32": round(times["fp32"] / s, 2)})
                best = min(times, key=times.get)
                print(f"{layer:8s} {n:6d}x{k:<5d} M={m:<4d} " +
                      " ".join(f"{name}={t * 1e6:9.1f}us" for name, t in times.items()) + f"  best={best}",
                      flush=True)
    out = write_results(args.name, rows, device_name("cpu") + f", torch.set_num_threads({args.threads})")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
