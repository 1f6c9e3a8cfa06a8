"""Backbone throughput: Sieve's decoder vs HF transformers' LlamaForCausalLM on the same SmolLM2 weights.

Both load the packaged GGUF (Q4_1, dequantized to the same float weights) and run the same shapes in one
process: prefill forward passes (hidden states, no LM head: what embedding and ranking use) and batch-1 greedy
decode. Prints a table, writes bench/results/backbone.json (+ .png).

    python bench/backbone.py [--threads 2] [--device cpu|cuda] [--dtypes float32,bfloat16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, device_name, timeit_paired, write_results  # noqa: E402
from sieve.backbone import generate, load_backbone  # noqa: E402

from sieve.registry import resolve_backbone  # noqa: E402
from sieve.settings import Settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="each is run for both systems")
    ap.add_argument("--shapes", default="8x256,1x2048", help="prefill batch x length, comma separated")
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--name", default=None, help="results file name (default backbone, or backbone-cuda)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM

    console = Console()
    path = resolve_backbone("smollm2-135m-instruct")
    device = device_name(args.device)
    rows: list[dict] = []
    for dtype_name in args.dtypes.split(","):
        ours = load_backbone(path, home=Settings().home / "cache", device=args.device, dtype=dtype_name).model
        hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                  dtype=getattr(torch, dtype_name)).to(dev).eval()
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 2
        rows += run_pair(ours, hf, dtype_name, args, dev, sync)
        del ours, hf

    by_key = {(r["dtype"], r["phase"], r["shape"], r["system"]): r for r in rows}
    for r in rows:
        if r["system"] == "sieve":
            base = by_key[(r["dtype"], r["phase"], r["shape"], "hf-transformers")]
            r["speedup"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)

    table = Table(title=f"backbone throughput, {device}")
    for col in ("dtype", "phase", "shape", "system", "ms", "tokens/s", "speedup"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["dtype"], r["phase"], r["shape"], r["system"], str(r["ms"]), str(r["tokens_per_s"]),
                      str(r.get("speedup", "")))
    console.print(table)
    name = args.name or ("backbone" if dev.type == "cpu" else "backbone-cuda")
    out = write_results(name, rows, device)
    plot(rows, RESULTS / f"{name}.png", device)
    console.print(f"wrote {out}")


def run_pair(ours, hf, dtype: str, args, dev: torch.device, sync) -> list[dict]:
    rows: list[dict] = []
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for shape in args.shapes.split(","):
            b, t = map(int, shape.split("x"))
            ids = torch.randint(100, 40000, (b, t), generator=gen).to(dev)
            runs = {
                "sieve": lambda ids=ids: ours(ids, return_logits=False),
                "hf-transformers": lambda ids=ids: hf.model(ids),
            }
            for system, s in timeit_paired(runs, repeat=args.repeat, sync=sync).items():
                rows.append({"system": system, "phase": "prefill", "shape": shape, "dtype": dtype,
                             "threads": args.threads, "ms": round(s * 1e3, 1), "tokens_per_s": round(b * t / s, 1)})
        prompt = torch.randint(100, 40000, (1, 32), generator=gen)
        n = args.decode_tokens
        runs = {
            "sieve": lambda: generate(ours, [prompt[0].tolist()], max_new_tokens=n),
            "hf-transformers": lambda: hf.generate(prompt.to(dev), max_new_tokens=n, min_new_tokens=n,
                                                   do_sample=False),
        }
        prefill_s = timeit_paired({"sieve": lambda: ours(prompt.to(dev), return_logits=False),
                                   "hf-transformers": lambda: hf.model(prompt.to(dev))}, sync=sync)
        for system, s in timeit_paired(runs, repeat=max(3, args.repeat // 2), sync=sync).items():
            per_token = (s - prefill_s[system]) / n  # decode only: the 32-token prompt's prefill taken out
            rows.append({"system": system, "phase": "decode", "shape": f"1x{n} after 32", "dtype": dtype,
                         "threads": args.threads, "ms": round(per_token * 1e3, 2),
                         "tokens_per_s": round(1 / per_token, 1)})

    return rows


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["dtype"], r["phase"], r["shape"]) for r in rows))
    systems = ["sieve", "hf-transformers"]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.38
    for i, system in enumerate(systems):
        by_group = {(r["dtype"], r["phase"], r["shape"]): r["tokens_per_s"] for r in rows if r["system"] == system}
        vals = [by_group[g] for g in groups]
        bars = ax.bar([x + (i - 0.5) * width for x in range(len(groups))], vals, width, label=system)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(groups)), [f"{d}\n{p} {s}" for d, p, s in groups], fontsize=7)
    ax.set_ylabel("tokens / s")
    ax.set_title(f"SmolLM2-135M forward throughput\n{device}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
