"""Can a learned, target-free expansion policy beat recency? Label training windows, fit, test on WikiText-2 test.

`label`: training windows (the continued-pretraining sources, or WikiText-2 *valid* only; never test), L context
tokens + the next 128, k-token blocks; each block's label is the decoder's loss drop on the continuation when it
alone is expanded (`refrag.train.expansion_gains`, what the oracle of bench/refrag_policies.py ranks by). Saves the
gains with the blocks' token ids and chunk-encoder vectors.

`eval`: target-free features per block (position, cosine to the last block, share of capitalised / digit / long
alphabetic tokens, mean log token id, share of its content tokens repeated elsewhere in the context or present in
the last block / last 4 blocks, last / second-to-last flags), a linear scorer fitted with the listwise softmax loss of
the training stage's policy; 4-fold cross-validated mean gain of the top quarter of blocks (learned, recency,
similarity, oracle) on the labelled windows; then perplexity of the next 128 tokens on WikiText-2 test windows with
25% of blocks expanded by recency, by the learned scorer, and by "tail": the last 3/4 of the expanded blocks at the
end, the rest picked by the learned scorer.

    python bench/refrag_policy_features.py label --seed 100 --windows 70 --out /tmp/pl/lab100.pt [--wikitext]
    python bench/refrag_policy_features.py eval /tmp/pl/*.pt [--limit 64] [--name refrag-policy-features]
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.progress import Progress
from sieve.refrag import Refrag, load_refrag
from sieve.refrag.data import TokenSampler, text_sources
from sieve.refrag.eval import wikitext_test_ids, wikitext_windows
from sieve.refrag.policy import block_positions, n_expanded, select
from sieve.refrag.train import TrainConfig, cpt_example, expansion_gains, lm_loss

from sieve.results import device_name, write_results
from sieve.settings import Settings

OFF = torch.autocast("cpu", enabled=False)
FEATURES = ("position", "position^4", "cosine to last block", "capitalised", "digits", "long alphabetic",
            "mean log id", "repeated in context", "in last block", "in last 4 blocks", "is last", "is second last")


def load(model: str) -> Refrag:
    return load_refrag(model, home=Settings().home / "cache", device="cpu", dtype="float32")


def label(args) -> None:
    r = load(args.model)
    cfg = TrainConfig(out=Path(args.out), data_root=Settings().data_path(), cpt_context_tokens=args.context,
                      cpt_target_tokens=128, seed=args.seed, k=r.k)
    if args.wikitext:
        cfg.sources = {"wikitext2-valid": 1.0}
    sampler = TokenSampler(r.tokenizer, text_sources(cfg.data_root), cfg.sources, seed=args.seed + 7)
    rng = random.Random(args.seed + 2)
    data = []
    with Progress() as bar:
        task = bar.add_task("label", total=args.windows)
        for w in range(args.windows):
            layout, _, n_target = cpt_example(r, sampler, cfg, rng)
            base, gains = expansion_gains(r, layout, n_target)
            data.append({"gains": gains, "base": base, "vectors": torch.stack([b.vector for b in layout.blocks]),
                         "block_ids": [list(b.token_ids) for b in layout.blocks]})
            if w % 5 == 4 or w == args.windows - 1:
                torch.save(data, args.out)
            bar.advance(task)


class TokenFlags:
    """Per-vocabulary-entry flags read from the decoded token text."""

    def __init__(self, tokenizer):
        text = [tokenizer.decode([i]).strip() for i in range(tokenizer.vocab_size)]
        self.cap = torch.tensor([bool(t) and t[0].isupper() for t in text], dtype=torch.float)
        self.digit = torch.tensor([any(c.isdigit() for c in t) for t in text], dtype=torch.float)
        self.alpha = torch.tensor([t.isalpha() and len(t) >= 4 for t in text], dtype=torch.float)


def _share(content: set[int], of: set[int]) -> float:
    return len(content & of) / max(len(content), 1)


def features(block_ids: list[list[int]], vectors: torch.Tensor, flags: TokenFlags) -> torch.Tensor:
    """[n blocks, len(FEATURES)]; nothing here reads the continuation."""
    n = len(block_ids)
    pos = block_positions(n)
    cos = F.cosine_similarity(vectors[-1:].float(), vectors.float(), dim=-1)
    last, tail = set(block_ids[-1]), {t for b in block_ids[-4:] for t in b}
    seen: dict[int, int] = {}
    for b in block_ids:
        for t in set(b):
            seen[t] = seen.get(t, 0) + 1
    rows = []
    for i, b in enumerate(block_ids):
        ids = torch.tensor(b)
        content = {t for t in b if flags.alpha[t] or flags.cap[t] or flags.digit[t]}
        rows.append([pos[i], pos[i] ** 4, cos[i], flags.cap[ids].mean(), flags.digit[ids].mean(),
                     flags.alpha[ids].mean(), torch.log(ids.float() + 1).mean() / 10,
                     _share(content, {t for t in content if seen[t] > 1}), _share(content, last), _share(content, tail),
                     float(i == n - 1), float(i == n - 2)])
    return torch.tensor(rows, dtype=torch.float)


def fit_linear(xs: list[torch.Tensor], gs: list[torch.Tensor], epochs: int = 100, seed: int = 0):
    """Listwise: softmax(scores) against softmax(gains / std), as the training stage fits its PolicyScorer."""
    torch.manual_seed(seed)
    mu, sd = torch.cat(xs).mean(0), torch.cat(xs).std(0) + 1e-6
    net = torch.nn.Linear(xs[0].shape[1], 1)
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=1e-2)
    for _ in range(epochs):
        for x, g in zip(xs, gs):
            target = F.softmax(g / (g.std() + 1e-6), 0)
            loss = -(target * F.log_softmax(net((x - mu) / sd).squeeze(-1), 0)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return lambda x: net((x - mu) / sd).squeeze(-1).detach()


def top_gain(scores: torch.Tensor, gains: torch.Tensor, p: float = 0.25) -> float:
    return float(gains[torch.topk(scores, n_expanded(len(gains), p)).indices].mean())


def cross_validate(xs, gs, folds: int = 4) -> dict[str, float]:
    order = list(range(len(xs)))
    random.Random(0).shuffle(order)
    got: dict[str, list[float]] = {"learned": [], "recency": [], "similarity": [], "oracle": []}
    for f in range(folds):
        val = set(order[f::folds])
        model = fit_linear([xs[i] for i in order if i not in val], [gs[i] for i in order if i not in val])
        for i in val:
            for name, s in (("learned", model(xs[i])), ("recency", xs[i][:, 0]), ("similarity", xs[i][:, 2]),
                            ("oracle", gs[i])):
                got[name].append(top_gain(s, gs[i]))
    return {name: round(sum(v) / len(v), 4) for name, v in got.items()}


def tail_plus(scores: torch.Tensor, m: int) -> set[int]:
    """The last 3/4 of the m blocks at the end of the context, the rest the scorer's best among the others."""
    n, t = len(scores), (3 * m) // 4
    rest = scores.clone()
    rest[n - t:] = -math.inf
    return set(range(n - t, n)) | set(torch.topk(rest, m - t).indices.tolist())


@torch.no_grad()
def evaluate(args) -> None:
    r = load(args.model)
    flags = TokenFlags(r.tokenizer)
    labelled = [w for f in args.labels for w in torch.load(f)]
    xs = [features(w["block_ids"], w["vectors"], flags) for w in labelled]
    gs = [w["gains"].float() for w in labelled]
    allx, allg = torch.cat(xs), torch.cat([(g - g.mean()) / (g.std() + 1e-6) for g in gs])
    corr = {name: round(float(torch.corrcoef(torch.stack([allx[:, j], allg]))[0, 1]), 3)
            for j, name in enumerate(FEATURES)}
    with torch.enable_grad():
        cv = cross_validate(xs, gs)
        model = fit_linear(xs, gs)
    print(f"{len(labelled)} labelled windows; feature / gain correlation {corr}")
    print(f"cross-validated mean gain of the top 25% of blocks: {cv}")
    ids = wikitext_test_ids(r.tokenizer, Settings().data_path())
    rows = []
    for length in [int(c) for c in args.contexts.split(",")]:
        windows = wikitext_windows(ids, length, 128, args.limit)
        totals: dict[str, float] = {}
        t0 = time.perf_counter()
        with Progress(transient=True) as bar:
            task = bar.add_task(f"L={length}", total=len(windows))
            for ctx_ids, target in windows:
                ctx = r.encode_ids([ctx_ids], r.k)[0]
                layout = r.lm_layout(ctx, target)
                scores = model(features([list(b.token_ids) for b in layout.blocks],
                                        torch.stack([b.vector for b in layout.blocks]), flags))
                m = n_expanded(ctx.n_blocks, args.expansion)
                chosen = {"full": set(range(ctx.n_blocks)),
                          "recency": r.choose_expansion(layout, args.expansion, policy="recency"),
                          "learned-features": select(scores, args.expansion),
                          "tail+learned-features": tail_plus(scores, m)}
                for name, c in chosen.items():
                    totals[name] = totals.get(name, 0.0) + lm_loss(r, [(layout, c, 128)], OFF).item()
                bar.advance(task)
        full = math.exp(totals["full"] / len(windows))
        for name, total in totals.items():
            ppl = math.exp(total / len(windows))
            rows.append({"system": args.model, "policy": name, "k": r.k, "dataset": "wikitext-2-raw", "split": "test",
                         "context_tokens": length, "target_tokens": 128, "windows": len(windows),
                         "expansion": 1.0 if name == "full" else args.expansion, "perplexity": round(ppl, 3),
                         "ppl_vs_full": round(ppl / full, 4), "labelled_windows": len(labelled),
                         "cv_top25_gain": cv, "feature_gain_correlation": corr})
            print(f"L={length:5d} {name:22s} ppl {ppl:8.3f}  {ppl / full:.3f}x full")
        print(f"L={length}: {len(windows)} windows in {time.perf_counter() - t0:.0f} s")
    print(write_results(args.name, rows, device_name("cpu")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    lab = sub.add_parser("label")
    lab.add_argument("--seed", type=int, default=100)
    lab.add_argument("--windows", type=int, default=70)
    lab.add_argument("--context", type=int, default=512)
    lab.add_argument("--wikitext", action="store_true", help="WikiText-2 valid windows only")
    lab.add_argument("--out", required=True)
    ev = sub.add_parser("eval")
    ev.add_argument("labels", nargs="+")
    ev.add_argument("--contexts", default="512")
    ev.add_argument("--limit", type=int, default=64)
    ev.add_argument("--expansion", type=float, default=0.25)
    ev.add_argument("--name", default="refrag-policy-features")
    for p in (lab, ev):
        p.add_argument("--model", default="refrag-k16")
        p.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    label(args) if args.cmd == "label" else evaluate(args)


if __name__ == "__main__":
    main()
