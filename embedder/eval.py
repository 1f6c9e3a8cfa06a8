"""Retrieval evaluation: embedders (brute-force cosine search) and BM25 (bm25s) on BEIR-style sets, scored with
trec_eval through pytrec_eval (nDCG@10, recall@100, MRR@10). Sets that ship candidates (TREC DL: BM25 top-100) are
scored as a rerank task over those candidates, as the data's INDEX says; the BM25 row there is the shipped run itself.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from .data import RetrievalSet, load_retrieval_set

METRICS = {"ndcg@10": "ndcg_cut_10", "recall@100": "recall_100", "mrr@10": "recip_rank"}  # ours -> trec_eval's


def dense_run(embedder, ds: RetrievalSet, *, k: int = 100, chunk: int = 256,
              console=None) -> dict[str, dict[str, float]]:
    from rich.progress import Progress

    doc_ids = sorted({d for docs in ds.candidates.values() for d in docs}) if ds.candidates else list(ds.corpus)
    vecs = []
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(f"{embedder.name}: {ds.name} corpus", total=len(doc_ids))
        for i in range(0, len(doc_ids), chunk):
            vecs.append(embedder.encode_documents([ds.corpus[d] for d in doc_ids[i: i + chunk]]))
            bar.update(task, advance=len(vecs[-1]))
    docs = np.concatenate(vecs)
    qids = list(ds.queries)
    queries = embedder.encode_queries([ds.queries[q] for q in qids])
    run: dict[str, dict[str, float]] = {}
    if ds.candidates:
        index = {d: i for i, d in enumerate(doc_ids)}
        for qi, q in enumerate(qids):
            cands = ds.candidates.get(q, [])
            scores = docs[[index[d] for d in cands]] @ queries[qi]
            run[q] = {d: float(s) for d, s in zip(cands, scores)}
        return run
    scores = queries @ docs.T
    top = np.argsort(-scores, axis=1)[:, :k]
    for qi, q in enumerate(qids):
        run[q] = {doc_ids[j]: float(scores[qi, j]) for j in top[qi]}
    return run


def bm25_run(ds: RetrievalSet, *, k: int = 100) -> dict[str, dict[str, float]]:
    if ds.candidates:  # the shipped first-stage run, in its order
        return {q: {d: float(len(c) - r) for r, d in enumerate(c)} for q, c in ds.candidates.items()}
    import bm25s
    import Stemmer

    stemmer = Stemmer.Stemmer("english")
    doc_ids = list(ds.corpus)
    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([ds.corpus[d] for d in doc_ids], stopwords="en", stemmer=stemmer,
                                   show_progress=False), show_progress=False)
    qids = list(ds.queries)
    hits, scores = retriever.retrieve(bm25s.tokenize([ds.queries[q] for q in qids], stopwords="en", stemmer=stemmer,
                                                     show_progress=False), k=min(k, len(doc_ids)), show_progress=False)
    return {q: {doc_ids[j]: float(s) for j, s in zip(hits[i], scores[i])} for i, q in enumerate(qids)}


def score(ds: RetrievalSet, run: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean nDCG@10, recall@100 and MRR@10 over every query with qrels (a query without results counts as zero),
    computed by trec_eval (pytrec_eval): gains are the qrels grades, ties in score are broken by document id,
    descending, as trec_eval does. (ranx gave the same values on every untied run and spent 15-70 s compiling
    numba code in each new process; trec_eval is C, milliseconds.)"""
    import pytrec_eval

    qrels = {q: {d: int(g) for d, g in rel.items()} for q, rel in ds.qrels.items()}
    if not qrels:
        return dict.fromkeys(METRICS, 0.0)
    full = {q: {d: float(s) for d, s in run[q].items()} for q in qrels if run.get(q)}
    top10 = {q: dict(sorted(r.items(), key=lambda kv: (kv[1], kv[0]), reverse=True)[:10]) for q, r in full.items()}
    cut = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut_10", "recall_100"}).evaluate(full) if full else {}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(top10) if top10 else {}
    per_query = [cut.get(q, {}) | rr.get(q, {}) for q in qrels]
    return {name: sum(m.get(measure, 0.0) for m in per_query) / len(qrels) for name, measure in METRICS.items()}


def evaluate(systems: list[str], datasets: list[str], *, data_root: Path, split: str, home: Path, device: str,
             dtype: str, max_doc_tokens: int, console=None) -> Iterator[dict]:
    """One result row per (dataset, system), yielded as soon as it is measured."""
    from sieve.registry import resolve_embedder

    from .model_dir import is_sentence_transformers, load_embedder

    loaded = {}
    for name in datasets:
        ds = load_retrieval_set(data_root, name, split)
        for system in systems:
            t0 = time.perf_counter()
            if system == "bm25":
                run = bm25_run(ds)
            else:
                if system not in loaded:
                    folder = resolve_embedder(system)
                    # `dtype` is for LLM embedders; small sentence-transformers baselines run in their float32
                    loaded[system] = load_embedder(folder, home=home, device=device,
                                                   dtype="float32" if is_sentence_transformers(folder) else dtype)
                    loaded[system].encoder.max_length = min(loaded[system].encoder.max_length, max_doc_tokens)
                run = dense_run(loaded[system], ds, console=console)
            metrics = score(ds, run)
            row = {"system": system, "dataset": name, "split": split, **{m: round(v, 4) for m, v in metrics.items()},
                   "queries": len(ds.qrels), "task": "rerank-bm25-top100" if ds.candidates else "full-corpus",
                   "seconds": round(time.perf_counter() - t0, 1)}
            if system != "bm25":
                row["max_doc_tokens"] = loaded[system].encoder.max_length
                row["dtype"] = str(_dtype_of(loaded[system])).removeprefix("torch.")
            if console is not None:
                console.print(row)
            yield row


def _dtype_of(embedder):
    enc = embedder.encoder
    return enc.backbone.dtype if hasattr(enc, "backbone") else next(enc.model.parameters()).dtype


def write_eval(name: str, rows: list[dict]) -> Path:
    from sieve.results import device_name, write_results

    return write_results(name, rows, device_name())
