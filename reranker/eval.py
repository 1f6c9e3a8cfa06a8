"""Reranking evaluation: rerank the top-`depth` of a first stage (BM25 with bm25s, or the Sieve embedder) on SciFact
test and TREC DL19 (its shipped BM25 top-100), and score nDCG@10 with trec_eval (pytrec_eval), as RankGPT / rank_llm do.

Rows per (dataset, first stage): the first stage itself, then each mode (sliding / full / first): nDCG@10,
seconds and tokens processed per query, and for decoded modes the wrong-format, repetition and missing rates
(share of decoded answers with that fault, read back from the answer text by `parse_permutation`, independent
of the constraint that produced it: they must be 0). `unconstrained` adds full ranking decoded greedily *without*
the constraint (answers repaired rank_llm-style), to show what the constraint prevents. `fusion` adds, for each
mode, a `<mode>+rrf` row: its order fused with the first stage's by reciprocal rank fusion (fusion.py), from the
same model calls (its seconds are the mode's).

`top_k`: full and sliding decode only what the top k needs (listwise.py) and the rest of the candidates keep their
first-stage order below them; with k = 10 the nDCG@10 is that of complete rankings (greedy decoding: the same top
10, tested), at a fraction of the decoding. A partial answer is "missing" when it lists fewer ids than asked.

`prior_check` adds `prior_correlation` to the score modes' rows (first, inline): the mean Spearman correlation
between a candidate list's scores under its own query and under another test query (the next one). Near 1 the
model scores the passages whatever is asked (a passage prior); a reranker that reads the query stays well below.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

from sieve.backbone.generate import generate

from .fusion import fuse_with_input_order
from .listwise import Reranker
from .permutation import parse_permutation

MODES = ("sliding", "full", "first", "inline")  # the default; "likelihood" on request
SCORE_MODES = ("first", "inline", "likelihood")  # every passage scored: fusion and the prior check read them all


def first_stage_run(ds, system: str, *, depth: int, home: Path, device: str, dtype: str, console=None):
    from sieve.embedder.eval import bm25_run, dense_run

    if system == "bm25":
        return bm25_run(ds, k=depth)
    from sieve.embedder import load_embedder

    from sieve.registry import resolve_embedder

    embedder = load_embedder(resolve_embedder(system), home=home, device=device, dtype=dtype)
    return dense_run(embedder, ds, k=depth, console=console)


def unconstrained_full(reranker: Reranker, query: str, passages: list[str]):
    """Greedy decoding of the full-ranking answer with no constraint -> (parsed permutation, tokens processed)."""
    prompt = reranker.prompts.build(query, passages)
    n = len(passages)
    out = generate(reranker.backbone.model, [prompt.ids], max_new_tokens=reranker.ids.output_length(n) + 16,
                   stop_tokens=[reranker.ids.eos], pad_id=reranker.backbone.tokenizer.pad_id)[0]
    return parse_permutation(reranker.backbone.tokenizer.decode(out), n), len(prompt.ids) + len(out) + 1


def evaluate(reranker: Reranker, datasets: list[str], *, data_root: Path, home: Path, device: str, dtype: str,
             first_stages: tuple[str, ...] = ("bm25",), modes: tuple[str, ...] = MODES, depth: int = 100,
             queries: int | None = None, unconstrained: bool = False, split: str = "test",
             top_k: int | None = None, fusion: bool = False, prior_check: bool = False,
             console=None) -> Iterator[dict]:
    """One row per (dataset, first stage, system), yielded as soon as it is measured."""
    from rich.progress import Progress
    from sieve.embedder.data import RetrievalSet, load_retrieval_set
    from sieve.embedder.eval import score

    for name in datasets:
        full_ds = load_retrieval_set(data_root, name, split)
        qids = sorted(full_ds.qrels)[:queries] if queries else sorted(full_ds.qrels)
        ds = RetrievalSet(full_ds.name, full_ds.corpus, {q: full_ds.queries[q] for q in qids},
                          {q: full_ds.qrels[q] for q in qids},
                          {q: c for q, c in full_ds.candidates.items() if q in qids} if full_ds.candidates else None)
        for stage in first_stages:
            t0 = time.perf_counter()
            base = first_stage_run(ds, stage, depth=depth, home=home, device=device, dtype=dtype, console=console)
            stage_seconds = time.perf_counter() - t0  # includes indexing the corpus (BM25) or encoding it (dense)
            common = {"dataset": name, "split": split, "first_stage": stage, "queries": len(qids), "passages": depth,
                      **({"top_k": top_k} if top_k else {})}
            yield {"system": stage, "mode": "first-stage", **common, "ndcg@10": round(score(ds, base)["ndcg@10"], 4),
                   "seconds_per_query": round(stage_seconds / max(len(qids), 1), 4)}
            ranked = {q: [d for d, _ in sorted(base.get(q, {}).items(), key=lambda x: -x[1])] for q in qids}
            candidates = {q: docs[:depth] for q, docs in ranked.items()}
            systems = list(modes) + (["unconstrained"] if unconstrained else [])
            for mode in systems:
                run, fused, seconds, tokens, caps, priors = {}, {}, 0.0, 0, [], []
                faults = {"wrong_format": 0, "repeated": 0, "missing": 0}
                answers = 0
                with Progress(console=console, transient=True, disable=console is None) as bar:
                    task = bar.add_task(f"{name} {stage} {mode}", total=len(qids))
                    for qi, q in enumerate(qids):
                        docs = candidates[q]
                        texts = [ds.corpus[d] for d in docs]
                        t = time.perf_counter()
                        if mode == "unconstrained":
                            parsed, used = unconstrained_full(reranker, ds.queries[q], texts) if docs else (None, 0)
                            order = parsed.order if parsed else []
                            tokens += used
                            parsed_all = [parsed] if parsed else []
                        else:
                            # score modes score every passage anyway: fusion and the prior check read all of them,
                            # as rank(fuse=True)
                            whole = (fusion or prior_check) and mode in SCORE_MODES
                            # fuse=False: each row is the mode alone, whatever the model's default (the +rrf row
                            # fuses it here)
                            res = reranker.rank(ds.queries[q], texts, mode=mode, top_k=None if whole else top_k,
                                                fuse=False)
                            order, tokens = res.order, tokens + res.stats.tokens_processed
                            caps.append(res.stats.passage_cap)
                            parsed_all = [parse_permutation(a, size, expected=k)
                                          for a, (size, k) in zip(res.answers, res.answer_shapes)]
                        seconds += time.perf_counter() - t
                        if prior_check and mode in SCORE_MODES and len(docs) > 2 and len(qids) > 1:
                            other = ds.queries[qids[(qi + 1) % len(qids)]]
                            again = reranker.rank(other, texts, mode=mode, fuse=False)
                            priors.append(spearman(by_passage(res.order, res.scores, len(docs)),
                                                   by_passage(again.order, again.scores, len(docs))))
                        for p in parsed_all:
                            answers += 1
                            faults["wrong_format"] += p.wrong_format
                            faults["repeated"] += p.repeated > 0
                            faults["missing"] += p.missing > 0
                        # reranked top-`depth` (with top_k: its top k, then the others in first-stage order), then
                        # the rest of the first stage (if it returned more) below it
                        chosen = set(order)
                        kept = ([docs[i] for i in order] + [d for i, d in enumerate(docs) if i not in chosen]
                                + ranked[q][depth:])
                        run[q] = _as_run(kept)
                        if fusion:
                            fused[q] = _as_run([docs[i] for i in fuse_with_input_order(order, len(docs))[0]]
                                               + ranked[q][depth:])
                        bar.update(task, advance=1)
                row = {"system": f"{stage}+{reranker.name}", "mode": mode, **common,
                       "ndcg@10": round(score(ds, run)["ndcg@10"], 4),
                       "seconds_per_query": round(seconds / max(len(qids), 1), 3),
                       "tokens_per_query": round(tokens / max(len(qids), 1), 1)}
                if caps:
                    row["passage_cap"] = min(caps)
                if priors:
                    row["prior_correlation"] = round(sum(priors) / len(priors), 4)
                if answers:
                    row.update({f"{k}_rate": round(v / answers, 4) for k, v in
                                (("wrong_format", faults["wrong_format"]), ("repetition", faults["repeated"]),
                                 ("missing", faults["missing"]))})
                    row["answers"] = answers
                if console is not None:
                    console.print(row)
                yield row
                if fusion:
                    row = {**row, "mode": f"{mode}+rrf", "ndcg@10": round(score(ds, fused)["ndcg@10"], 4)}
                    if console is not None:
                        console.print(row)
                    yield row


def by_passage(order: list[int], scores: list[float], n: int) -> list[float]:
    """A result's scores (aligned with its order) -> one score per passage index."""
    out = [0.0] * n
    for i, v in zip(order, scores):
        out[i] = v
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation of two score lists (average ranks for ties); 0 when either is constant."""
    from scipy.stats import spearmanr

    if len(set(a)) < 2 or len(set(b)) < 2:
        return 0.0
    return float(spearmanr(a, b).statistic)


def _as_run(docs: list[str]) -> dict[str, float]:
    """A ranked list -> a run (higher is better)."""
    return {d: float(len(docs) - r) for r, d in enumerate(docs)}


def write_eval(name: str, rows: list[dict]) -> Path:
    from sieve.results import device_name, write_results

    return write_results(name, rows, device_name())
