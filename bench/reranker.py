"""Reranking cost: full ranking in one pass vs the sliding window (20, stride 10, back to front) vs FIRST, with the
same model on the same candidates, in one run, for 20, 50 and 100 passages.

Candidates: the shipped BM25 top-100 of the first --queries TREC DL19 queries (real passages). Every mode gets the
same per-passage cap (the one the full prompt needs for that many passages), so the strategies see the same text.
Timing is interleaved (full, sliding, first, full, ...) per size; tokens processed = prefill tokens (all windows
for sliding, the id trie for first) + decoded tokens. Constrained decoding is speculative (reranker/speculative.py:
the rest of the answer drafted in prompt order and checked in one forward; forced tokens ride along), for full and
sliding alike; `--plain` adds `full-plain` and `sliding-plain` rows, one forward per id digit (jump-forward only),
to measure what the drafts save, and `--stepwise` rows of one forward per token. `--sparse` adds `full-sparse` and
`sliding-sparse` rows whose prompts run the block-sparse prefill (sieve.kernels; prompts under its `min_length`
stay dense), with the share of blocks computed and whether the ranking matches the dense one. `--top-k 10` adds
`full@10` and `sliding@10` rows: the same rankers asked for the top 10 only (what nDCG@10 and a search page need):
full ranking then decodes 10 ids after its one prefill, the sliding window still reads every window and decodes
each one's top 10 (what the next window and the final top 10 need); their top 10 are exactly those of the
complete rankings. Writes bench/results/reranker-speed.json (+ .png).

    python bench/reranker.py [--sizes 20,50,100] [--queries 1] [--repeat 1] [--threads 2] [--device cpu]
                             [--dtype auto] [--window 20 --stride 10] [--plain] [--stepwise] [--sparse] [--top-k 10]
                             [--no-pack]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import RESULTS, device_name, write_results  # noqa: E402
from sieve.backbone.runtime import apply_speed_options  # noqa: E402
from sieve.embedder.data import load_retrieval_set  # noqa: E402
from sieve.reranker import load_reranker  # noqa: E402

from sieve.settings import Settings  # noqa: E402

MODES = ("full", "sliding", "first")
STEPWISE = "-stepwise"  # suffix of the rows decoded one forward per token
PLAIN = "-plain"  # suffix of the rows decoded one forward per id digit (jump-forward, no drafts)
SPARSE = "-sparse"  # suffix of the rows whose prompts are prefilled with block-sparse attention


def row_label(mode: str, top_k: int | None) -> str:
    return f"{mode}@{top_k}" if top_k else mode


def base_mode(label: str) -> str:
    return label.removesuffix(STEPWISE).removesuffix(PLAIN).removesuffix(SPARSE).split("@")[0]


def measure(rerankers: dict, query: str, texts: list[str], repeat: int, sync) -> dict[str, dict]:
    """Median seconds and the stats of each row (label -> (reranker, mode, top_k)), repetitions interleaved."""
    times: dict[str, list[float]] = {label: [] for label in rerankers}
    stats, orders = {}, {}
    for _ in range(repeat):
        for label, (reranker, mode, top_k) in rerankers.items():
            t0 = time.perf_counter()
            res = reranker.rank(query, texts, mode=mode, top_k=top_k, fuse=False)
            sync()
            times[label].append(time.perf_counter() - t0)
            stats[label], orders[label] = res.stats, res.order
    return {label: {"seconds": statistics.median(times[label]), "stats": stats[label], "order": orders[label]}
            for label in rerankers}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="20,50,100")
    ap.add_argument("--queries", type=int, default=1, help="DL19 queries (results are averaged over them)")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of the smallest size first")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--model", default="sieve-rank")
    ap.add_argument("--name", default="reranker-speed")
    ap.add_argument("--window", type=int, default=20, help="sliding window (the baseline is 20, stride 10)")
    ap.add_argument("--stride", type=int, default=10)
    ap.add_argument("--stepwise", action="store_true", help="also full and sliding decoded one token a forward")
    ap.add_argument("--plain", action="store_true", help="also full and sliding without speculative drafts")
    ap.add_argument("--sparse", action="store_true", help="also full and sliding with the block-sparse prefill "
                    "(sieve.kernels: Triton on CUDA, the dense-cost torch reference on a CPU)")
    ap.add_argument("--top-k", type=int, default=None, help="also full and sliding asked for the top k only")
    ap.add_argument("--no-pack", action="store_true", help="plain nn.Linear weights (the service packs float32 "
                    "linears for oneDNN on the CPU, backbone.runtime.apply_speed_options)")
    ap.add_argument("--cudnn-sdpa", action="store_true", help="CUDA: let SDPA use cuDNN attention again (the backbone "
                    "turns it off: it builds a plan for every new shape)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    reranker = load_reranker(args.model, home=settings.home / "cache", device=args.device, dtype=args.dtype)
    if args.cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(True)
    reranker.window, reranker.stride = args.window, args.stride
    apply_speed_options(reranker.backbone.model, pack=not args.no_pack)  # as the service runs it
    rows_to_run = {mode: (reranker, mode, None) for mode in MODES}
    if args.top_k:
        rows_to_run |= {row_label(mode, args.top_k): (reranker, mode, args.top_k) for mode in ("full", "sliding")}
    if args.sparse:
        from sieve.kernels import SparseConfig, SparseStats, register_sparse_attention

        sparse_fn, _ = register_sparse_attention(SparseConfig(min_length=4096))  # the 8K prompt goes sparse
        variant = copy.copy(reranker)
        variant.prefill_mode = "sparse"
        rows_to_run |= {f"{mode}{SPARSE}": (variant, mode, None) for mode in ("full", "sliding")}
    for flag, suffix, jump in ((args.plain, PLAIN, True), (args.stepwise, STEPWISE, False)):
        if flag:
            variant = copy.copy(reranker)
            variant.speculative, variant.jump_forward = False, jump
            rows_to_run |= {f"{mode}{suffix}": (variant, mode, None) for mode in ("full", "sliding")}
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    ds = load_retrieval_set(settings.data_path(), "trec-dl-2019")
    qids = sorted(ds.candidates)[: args.queries]
    sizes = [int(s) for s in args.sizes.split(",")]
    for _ in range(args.warmup):
        q = qids[0]
        for r, mode, top_k in rows_to_run.values():
            r.rank(ds.queries[q], [ds.corpus[d] for d in ds.candidates[q][: min(sizes)]], mode=mode, top_k=top_k,
                   fuse=False)

    rows = []
    for n in sizes:
        if args.sparse:
            sparse_fn.stats = SparseStats()  # density per size
        per_query = [measure(rows_to_run, ds.queries[q], [ds.corpus[d] for d in ds.candidates[q][:n]], args.repeat,
                             sync) for q in qids]
        for mode, (_, _, top_k) in rows_to_run.items():
            sliding_s = statistics.mean(r[row_label("sliding", top_k)]["seconds"] for r in per_query)
            seconds = statistics.mean(r[mode]["seconds"] for r in per_query)
            st = [r[mode]["stats"] for r in per_query]
            rows.append({
                "system": reranker.name, "mode": mode, "passages": n, "queries": len(qids), "top_k": top_k,
                "window": f"{args.window}/{args.stride}" if mode.startswith("sliding") else "",
                "device": device_name(args.device), "sdpa": "with cuDNN" if args.cudnn_sdpa else "no cuDNN",
                "dtype": str(reranker.backbone.dtype).removeprefix("torch."),
                "weights": "plain" if args.no_pack else "oneDNN-packed where float32 on CPU",
                "seconds": round(seconds, 3),
                "tokens_processed": round(statistics.mean(s.tokens_processed for s in st), 1),
                "prompt_tokens": round(statistics.mean(s.prompt_tokens for s in st), 1),
                "generated_tokens": round(statistics.mean(s.generated_tokens for s in st), 1),
                "decode_forwards": round(statistics.mean(s.decode_forwards for s in st), 1),
                "forward_passes": round(statistics.mean(s.forward_passes for s in st), 1),
                "drafted": round(statistics.mean(s.drafted for s in st), 1),
                "accepted": round(statistics.mean(s.accepted for s in st), 1),
                "passage_cap": min(s.passage_cap for s in st),
                "speedup_vs_sliding": round(sliding_s / seconds, 2) if seconds else None,
            })
            for twin, key in ((f"{mode}{PLAIN}", "same_order_as_plain"), (f"{mode}{SPARSE}", "same_order_as_sparse")):
                if twin in rows_to_run:  # speculative decoding is lossless; sparse prefill need not be
                    rows[-1][key] = sum(r[mode]["order"] == r[twin]["order"] for r in per_query) / len(per_query)
            if mode.endswith(SPARSE):  # share of the causal blocks the sparse prefills computed (calls >= min_length)
                rows[-1].update(sparse_density=round(sparse_fn.stats.density, 4),
                                sparse_calls=sparse_fn.stats.sparse_calls, dense_calls=sparse_fn.stats.dense_calls)
            print(rows[-1], flush=True)

    device = device_name(args.device)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"reranking cost, {device}")
    for col in ("passages", "mode", "seconds", "tokens", "decoded", "decode forwards", "passes", "vs sliding"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["passages"]), r["mode"], str(r["seconds"]), str(r["tokens_processed"]),
                      str(r["generated_tokens"]), str(r["decode_forwards"]), str(r["forward_passes"]),
                      str(r["speedup_vs_sliding"]))
    Console().print(table)
    out = write_results(args.name, rows, device)
    plot(rows, RESULTS / f"{args.name}.png", device)
    print(f"wrote {out}")


def plot(rows: list[dict], path: Path, device: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    sizes = sorted({r["passages"] for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    for mode in modes:
        mine = [next(r for r in rows if r["passages"] == n and r["mode"] == mode) for n in sizes]
        style = dict(marker="o" if "@" not in mode else "s", color=f"C{MODES.index(base_mode(mode))}", label=mode,
                     linestyle="--" if mode.endswith((STEPWISE, PLAIN)) else ":" if "@" in mode else "-")
        axes[0].plot(sizes, [r["seconds"] for r in mine], **style)
        if not mode.endswith((STEPWISE, PLAIN)):
            axes[1].plot(sizes, [r["tokens_processed"] for r in mine], **style)
    axes[0].set_ylabel("seconds per query")
    axes[1].set_ylabel("tokens processed per query")
    for ax in axes:
        ax.set_xlabel("passages")
        ax.legend(fontsize=8)
    fig.suptitle(f"Full vs sliding vs FIRST reranking, same model\n{device}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
