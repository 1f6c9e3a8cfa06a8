"""REFRAG expansion policies against an oracle: how much of the gap to the full context a policy could close.

WikiText-2 raw test, the windows of `sieve eval refrag --task wikitext` (L context tokens, the next 128 scored),
k-token blocks, a fraction p of blocks expanded (fed as tokens), perplexity of the continuation per policy:

  recency, similarity   the shipped heuristics (refrag/policy.py)
  proxy-gain            target-free "decoder's perplexity gain": the last block stays expanded and is the proxy
                        target; the other blocks are ranked by how much expanding each alone lowers the loss on it
  oracle                ranks blocks by how much expanding each alone lowers the loss on the *real* continuation.
                        It reads the answer, so it is an upper bound for a policy that sees one block at a time
                        (what the paper's RL policy is trained towards), not a policy anyone can serve
  full / compressed     every block / no block expanded

Writes bench/results/NAME.json (rows: policy, context_tokens, perplexity, ppl_vs_full).

    python bench/refrag_policies.py [--model refrag-k16] [--contexts 512] [--limit 16] [--expansion 0.25]
                                    [--threads 2] [--name refrag-policy-headroom]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from rich.progress import Progress
from sieve.refrag import Refrag, load_refrag
from sieve.refrag.encoder import EncodedPassage
from sieve.refrag.eval import wikitext_test_ids, wikitext_windows
from sieve.refrag.policy import n_expanded, select
from sieve.refrag.train import expansion_gains, lm_loss

from sieve.results import device_name, write_results
from sieve.settings import Settings

OFF = torch.autocast("cpu", enabled=False)


def proxy_gain(r: Refrag, ctx: EncodedPassage, m: int) -> set[int]:
    """Target-free: the last block is the proxy target (its tokens are known); keep it expanded and add the m - 1
    blocks whose expansion alone most lowers the loss on it."""
    n = ctx.n_blocks
    if m <= 1 or n < 2:
        return set(range(n - m, n))
    cut = ctx.spans[-1][0]
    head = r.encode_ids([ctx.token_ids[:cut]], ctx.k)[0]
    _, gains = expansion_gains(r, r.lm_layout(head, ctx.token_ids[cut:]), len(ctx.token_ids) - cut)
    return {n - 1} | select(gains, (m - 1) / head.n_blocks)


@torch.no_grad()
def window_losses(r: Refrag, ctx_ids: list[int], target: list[int], k: int, p: float) -> dict[str, float]:
    ctx = r.encode_ids([ctx_ids], k)[0]
    layout = r.lm_layout(ctx, target)
    n = ctx.n_blocks
    m = n_expanded(n, p)
    chosen = {"full": set(range(n)), "compressed": set(),
              "recency": r.choose_expansion(layout, p, policy="recency"),
              "similarity": r.choose_expansion(layout, p, policy="similarity"),
              "proxy-gain": proxy_gain(r, ctx, m),
              "oracle": select(expansion_gains(r, layout, len(target))[1], p)}
    assert all(len(s) == m for name, s in chosen.items() if name not in ("full", "compressed"))
    return {name: lm_loss(r, [(layout, s, len(target))], OFF).item() for name, s in chosen.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="refrag-k16")
    ap.add_argument("--contexts", default="512")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--expansion", type=float, default=0.25)
    ap.add_argument("--target-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--name", default="refrag-policy-headroom")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    settings = Settings()
    r = load_refrag(args.model, home=settings.home / "cache", device="cpu", dtype="float32")
    ids = wikitext_test_ids(r.tokenizer, settings.data_path())
    rows = []
    for length in [int(c) for c in args.contexts.split(",")]:
        windows = wikitext_windows(ids, length, args.target_tokens, args.limit)
        totals: dict[str, float] = {}
        t0 = time.perf_counter()
        with Progress(transient=True) as bar:
            task = bar.add_task(f"L={length}", total=len(windows))
            for ctx_ids, target in windows:
                for name, loss in window_losses(r, ctx_ids, target, r.k, args.expansion).items():
                    totals[name] = totals.get(name, 0.0) + loss
                bar.advance(task)
        full = math.exp(totals["full"] / len(windows))
        for name, total in totals.items():
            ppl = math.exp(total / len(windows))
            rows.append({"system": args.model, "policy": name, "k": r.k, "dataset": "wikitext-2-raw",
                         "split": "test", "context_tokens": length, "target_tokens": args.target_tokens,
                         "windows": len(windows), "expansion": 0.0 if name == "compressed" else
                         1.0 if name == "full" else args.expansion, "perplexity": round(ppl, 3),
                         "ppl_vs_full": round(ppl / full, 4)})
            print(f"L={length:5d} {name:11s} ppl {ppl:8.3f}  {ppl / full:.3f}x full")
        print(f"L={length}: {len(windows)} windows in {time.perf_counter() - t0:.0f} s")
    print(write_results(args.name, rows, device_name("cpu")))


if __name__ == "__main__":
    main()
