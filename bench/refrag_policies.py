"""REFRAG expansion policies against an oracle: how much of the gap to the full context a policy could close.

WikiText-2 raw test, the windows of `sieve eval refrag --task wikitext` (L context tokens, the next 128 scored),
k-token blocks, a fraction p of blocks expanded (fed as tokens), perplexity of the continuation per policy:

  recency, similarity   the shipped heuristics (refrag/policy.py)
  proxy-gain            target-free "decoder's perplexity gain": the last block stays expanded and is the proxy
                        target; the other blocks are ranked by how much expanding each alone lowers the loss on it
  oracle                ranks blocks by how much expanding each alone lowers the loss on the *real* continuation.
                        It reads the answer, so it is an upper bound for a policy that sees one block at a time
                        (what the paper's RL policy is trained towards), not a policy anyone can serve
  target-overlap        the last 4 blocks + the blocks sharing the most content tokens with the real continuation
                        (reads the answer too: how far "expand what the continuation repeats" could go)
  draft-overlap         target-free twin of target-overlap: the decoder drafts the continuation (--draft-tokens,
                        greedy, from the fully compressed prompt) and the draft stands in for the real one
  full / compressed     every block / no block expanded

Writes bench/results/NAME.json (rows: policy, context_tokens, perplexity, ppl_vs_full).

    python bench/refrag_policies.py [--model refrag-k16] [--contexts 512] [--limit 16] [--expansion 0.25]
                                    [--threads 2] [--skip oracle,proxy-gain] [--name refrag-policy-headroom]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from rich.progress import Progress
from sieve.refrag import Refrag, load_refrag
from sieve.refrag.answer import prefill_embeds
from sieve.refrag.encoder import EncodedPassage
from sieve.refrag.eval import wikitext_test_ids, wikitext_windows
from sieve.refrag.policy import n_expanded, select
from sieve.refrag.train import expansion_gains, lm_loss

from sieve.results import device_name, write_results
from sieve.settings import Settings

OFF = torch.autocast("cpu", enabled=False)
POLICIES = ("recency", "similarity", "proxy-gain", "oracle", "target-overlap", "draft-overlap")
TAIL = 4  # blocks at the end the overlap policies always expand
# frequent words that carry no content; with tokens under 3 characters and punctuation they never count as overlap
STOPWORDS = frozenset("the and for was with that his her from were which are has had not but its this also their "
                      "they she him who been have one two unk".split())


def content_tokens(r: Refrag, token_ids: list[int]) -> set[int]:
    """The ids among `token_ids` whose text is a word of 3+ characters that is not a stopword."""
    out = set()
    for t in set(token_ids):
        w = r.tokenizer.decode([t]).strip()
        if len(w) >= 3 and any(c.isalnum() for c in w) and w.lower() not in STOPWORDS:
            out.add(t)
    return out


def overlap_choice(r: Refrag, ctx: EncodedPassage, words: list[int], m: int) -> set[int]:
    """The last TAIL blocks + the m - TAIL others sharing the most content tokens with `words` (later first on ties)."""
    n = ctx.n_blocks
    tail = set(range(max(n - TAIL, 0), n))
    if m <= len(tail):
        return set(range(n - m, n))
    want = content_tokens(r, words)
    scores = torch.tensor([len(want & set(ctx.block_ids(b))) + b / (2 * n) if b not in tail else -1.0
                           for b in range(n)])
    return tail | set(torch.topk(scores, m - len(tail)).indices.tolist())


@torch.no_grad()
def draft(r: Refrag, context: EncodedPassage, n_tokens: int) -> list[int]:
    """The decoder's greedy continuation of the fully compressed context."""
    cursor, logits = prefill_embeds(r.model, r.embed(r.lm_layout(context)), n_tokens)
    out = []
    for i in range(n_tokens):
        token = logits.argmax(-1)
        out.append(int(token[0]))
        if i < n_tokens - 1:
            logits = cursor.step(token)
    return out


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
def window_losses(r: Refrag, ctx_ids: list[int], target: list[int], k: int, p: float,
                  policies=POLICIES, draft_tokens: int = 32) -> dict[str, float]:
    ctx = r.encode_ids([ctx_ids], k)[0]
    layout = r.lm_layout(ctx, target)
    n = ctx.n_blocks
    m = n_expanded(n, p)
    pick = {"recency": lambda: r.choose_expansion(layout, p, policy="recency"),
            "similarity": lambda: r.choose_expansion(layout, p, policy="similarity"),
            "proxy-gain": lambda: proxy_gain(r, ctx, m),
            "oracle": lambda: select(expansion_gains(r, layout, len(target))[1], p),
            "target-overlap": lambda: overlap_choice(r, ctx, target, m),
            "draft-overlap": lambda: overlap_choice(r, ctx, draft(r, ctx, draft_tokens), m)}
    chosen = {"full": set(range(n)), "compressed": set()} | {name: pick[name]() for name in policies}
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
    ap.add_argument("--skip", default="", help=f"comma-separated policies not to run, of {', '.join(POLICIES)}")
    ap.add_argument("--draft-tokens", type=int, default=32)
    ap.add_argument("--name", default="refrag-policy-headroom")
    args = ap.parse_args()
    skip = {x for x in args.skip.split(",") if x}
    if skip - set(POLICIES):
        ap.error(f"unknown policies in --skip: {', '.join(sorted(skip - set(POLICIES)))}")
    policies = [x for x in POLICIES if x not in skip]
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
                for name, loss in window_losses(r, ctx_ids, target, r.k, args.expansion, policies,
                                                args.draft_tokens).items():
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
            print(f"L={length:5d} {name:14s} ppl {ppl:8.3f}  {ppl / full:.3f}x full")
        print(f"L={length}: {len(windows)} windows in {time.perf_counter() - t0:.0f} s")
    print(write_results(args.name, rows, device_name("cpu")))


if __name__ == "__main__":
    main()
