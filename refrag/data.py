"""Training and evaluation data from ../shared/data: training portions only for training.

Text (reconstruction, continued pre-training): Paul Graham essays, Gutenberg books (the first `max_books`, header
and licence cut), and WikiText-2 *valid* (tokenized release, detokenized here; raw WikiText-2 train is not in
../shared/data). WikiText-2 *test* is read only by eval.py.

QA: NQ-open oracle train portion (1,655) for task tuning, eval portion (1,000) for evaluation. Retrieved passages
are built as INDEX.md says: the gold passage plus the BM25 top passages of a pool (those containing an answer
string excluded), in an order fixed by a seeded shuffle. For training the pool is the *train* portion's gold
passages only, so no evaluated passage is ever seen in training; for evaluation it is all 2,655 (the 20-document set).
"""

from __future__ import annotations

import gzip
import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

from sieve.backbone import Tokenizer

NQ_TRAIN = "qa/nq-open/nq-open-oracle.train.rag.jsonl.gz"
NQ_EVAL = "qa/nq-open/nq-open-oracle.eval.rag.jsonl.gz"
NQ_ALL = "qa/nq-open/nq-open-oracle.rag.jsonl.gz"


# ------------------------------------------------------------------------------------------------------ text


def detok_wikitext(text: str) -> str:
    for a, b in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", "."), (" , ", ", "), (" . ", ". "), (" ; ", "; "),
                 (" : ", ": "), (" 's", "'s"), ("( ", "("), (" )", ")"), (" n't", "n't")):
        text = text.replace(a, b)
    return text


def essays(root: Path) -> list[str]:
    return [p.read_text() for p in sorted((root / "text/pg-essays").glob("*.txt"))]


def books(root: Path, max_books: int = 12, max_chars: int = 400_000) -> list[str]:
    out = []
    with gzip.open(root / "text/long-docs/gutenberg-books.jsonl.gz", "rt") as f:
        for line in f:
            text = json.loads(line)["text"]
            start = text.find("*** START")
            text = text[text.find("\n", start) + 1:] if start >= 0 else text
            end = text.find("*** END")
            out.append(text[: end if end > 0 else None][:max_chars])
            if len(out) >= max_books:
                break
    return out


def wikitext_valid(root: Path) -> list[str]:
    raw = (root / "text/wikitext-2-tokenized/valid.txt").read_text()
    articles = re.split(r"\n \= (?!=)[^\n]*(?<!=) \= \n", raw)
    return [detok_wikitext(a) for a in articles if len(a) > 2000]


def text_sources(root: Path) -> dict[str, list[str]]:
    return {"essays": essays(root), "books": books(root), "wikitext2-valid": wikitext_valid(root)}


class TokenSampler:
    """Random windows of n decoder tokens from the training text, sources drawn by weight."""

    def __init__(self, tokenizer: Tokenizer, sources: dict[str, list[str]], weights: dict[str, float], seed: int = 0):
        self.rng = random.Random(seed)
        self.docs = {name: [d for d in tokenizer.encode_batch(docs, add_bos=False) if len(d) > 64]
                     for name, docs in sources.items() if weights.get(name, 0) > 0}
        self.weights = {n: weights[n] for n in self.docs}
        self.tokens = {n: sum(len(d) for d in docs) for n, docs in self.docs.items()}

    def sample(self, n: int) -> list[int]:
        name = self.rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        docs = [d for d in self.docs[name] if len(d) >= n] or [max(self.docs[name], key=len)]
        doc = self.rng.choices(docs, weights=[len(d) for d in docs])[0]
        start = self.rng.randrange(0, max(1, len(doc) - n + 1))
        return doc[start:start + n]


# ------------------------------------------------------------------------------------------------------ QA


@dataclass
class QAExample:
    id: str
    question: str
    answers: list[str]
    passages: list[str]  # "title\ntext"
    gold: list[int]


def read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def passage_text(p: dict) -> str:
    return f"{p['title']}\n{p['text']}" if p.get("title") else p["text"]


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, answers: list[str]) -> bool:
    return normalize_answer(prediction) in {normalize_answer(a) for a in answers}


def has_answer(prediction: str, answers: list[str]) -> bool:
    """Lost-in-the-middle 'accuracy': a normalized answer appears in the normalized prediction."""
    pred = normalize_answer(prediction)
    return any(normalize_answer(a) and normalize_answer(a) in pred for a in answers)


def with_retrieved(rows: list[dict], pool_rows: list[dict], n_docs: int, seed: int = 0) -> list[QAExample]:
    """Each question's gold passage + the (n_docs - 1) passages of the pool BM25 ranks highest for it (passages that
    contain an answer string excluded), shuffled by a per-question seeded RNG."""
    import bm25s

    pool = list({passage_text(p): None for r in pool_rows for p in r["passages"]})
    retriever = None
    if n_docs > 1:
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(pool, stopwords="en", show_progress=False), show_progress=False)
        hits, _ = retriever.retrieve(bm25s.tokenize([r["question"] for r in rows], stopwords="en",
                                                    show_progress=False), k=min(len(pool), n_docs + 30),
                                     show_progress=False)
    out = []
    for i, r in enumerate(rows):
        gold = passage_text(r["passages"][r["gold"][0]])
        docs = [gold]
        if retriever is not None:
            answers = [normalize_answer(a) for a in r["answers"]]
            for j in hits[i].tolist():
                cand = pool[j]
                if cand == gold or any(a and a in normalize_answer(cand) for a in answers):
                    continue
                docs.append(cand)
                if len(docs) == n_docs:
                    break
        order = list(range(len(docs)))
        random.Random(f"{seed}-{r['id']}").shuffle(order)
        out.append(QAExample(r["id"], r["question"], r["answers"], [docs[o] for o in order], [order.index(0)]))
    return out


def nq_train(root: Path, n_docs: int = 5, seed: int = 0) -> list[QAExample]:
    rows = read_jsonl(root / NQ_TRAIN)
    return with_retrieved(rows, rows, n_docs, seed)


def nq_eval(root: Path, n_docs: int = 20, seed: int = 0, limit: int | None = None) -> list[QAExample]:
    """The NQ-open 20-document evaluation set, built from the oracle files (see the module docstring)."""
    rows = read_jsonl(root / NQ_EVAL)[:limit]
    return with_retrieved(rows, read_jsonl(root / NQ_ALL), n_docs, seed)
