"""Read the shared data: BEIR-style retrieval sets and training pairs. Nothing here is copied into the repo.

BEIR layout: corpus.jsonl[.gz] {_id,title,text}, queries.jsonl {_id,text}, qrels/<split>.tsv (header row).
TREC DL sets also ship `run/bm25_top100.trec`: the candidates an embedder re-scores there.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def _open(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path, encoding="utf-8")


def read_jsonl(path: Path) -> Iterator[dict]:
    with _open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


@dataclass
class RetrievalSet:
    name: str
    corpus: dict[str, str]  # doc id -> "title text"
    queries: dict[str, str]  # only queries judged in the split
    qrels: dict[str, dict[str, int]]  # query id -> doc id -> grade
    candidates: dict[str, list[str]] | None = None  # per-query candidate docs (rerank task), None: full corpus


def find_file(folder: Path, stem: str) -> Path:
    for name in (f"{stem}.jsonl", f"{stem}.jsonl.gz"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"no {stem}.jsonl[.gz] in {folder}")


def read_qrels(path: Path) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = defaultdict(dict)
    with open(path, encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t")
        next(rows)  # header
        for row in rows:
            if len(row) >= 3:
                qrels[row[0]][row[1]] = int(row[2])
    return dict(qrels)


def read_trec_run(path: Path) -> dict[str, list[str]]:
    run: dict[str, list[tuple[int, str]]] = defaultdict(list)
    with open(path, encoding="utf-8") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4:
                run[parts[0]].append((int(parts[3]), parts[2]))
    return {q: [d for _, d in sorted(docs)] for q, docs in run.items()}


def doc_text(doc: dict) -> str:
    """A document as one text: "title text" (BEIR's corpus and the QA sets' passages alike)."""
    return f"{doc.get('title') or ''} {doc.get('text') or ''}".strip()


def load_retrieval_set(root: Path, name: str, split: str = "test") -> RetrievalSet:
    folder = root / "retrieval" / name
    if not folder.is_dir():
        known = sorted(p.name for p in (root / "retrieval").iterdir() if p.is_dir())
        raise FileNotFoundError(f"no dataset {name!r} under {root / 'retrieval'}; known: {', '.join(known)}")
    qrels = read_qrels(folder / "qrels" / f"{split}.tsv")
    corpus = {d["_id"]: doc_text(d) for d in read_jsonl(find_file(folder, "corpus"))}
    queries = {q["_id"]: q["text"] for q in read_jsonl(find_file(folder, "queries")) if q["_id"] in qrels}
    qrels = {q: rel for q, rel in qrels.items() if q in queries}
    candidates = None
    runs = sorted((folder / "run").glob("*.trec")) if (folder / "run").is_dir() else []
    if runs:
        candidates = {q: [d for d in docs if d in corpus] for q, docs in read_trec_run(runs[0]).items() if q in queries}
    return RetrievalSet(name, corpus, queries, qrels, candidates)


@dataclass
class Pair:
    query: str
    positive: str
    source: str
    negatives: tuple[str, ...] = ()


def medquad_pairs(root: Path) -> list[Pair]:
    return [Pair(r["query"], r["positive"], "medquad") for r in read_jsonl(root / "train" / "medquad_pairs.jsonl.gz")]


def nq_train_pairs(root: Path) -> list[Pair]:
    """NQ-open questions of the oracle set's *train* portion with their gold Wikipedia passage (never the eval
    portion, which the REFRAG evaluation reports)."""
    rows = read_jsonl(root / "qa" / "nq-open" / "nq-open-oracle.train.rag.jsonl.gz")
    return [Pair(r["question"], doc_text(p), "nq-train")
            for r in rows for i, p in enumerate(r["passages"]) if i in r["gold"]]


def scifact_train_pairs(root: Path) -> tuple[list[Pair], RetrievalSet]:
    """SciFact *train* claims with their abstracts (never the test split)."""
    ds = load_retrieval_set(root, "scifact", split="train")
    pairs = [Pair(ds.queries[q], ds.corpus[d], "scifact-train") for q, rel in ds.qrels.items() for d, g in rel.items()
             if g > 0 and d in ds.corpus]
    return pairs, ds
