"""Complete listwise training labels from training data only ("Sliding Windows Are Not the End", section 4).

A list source holds queries with judged positives over a corpus. For a query, candidates are the BM25 (bm25s)
top-`n` of that corpus, in BM25 order (the order the reranker sees at inference); judged positives missing from the
top-n replace the lowest-ranked candidates. The label is a *complete* ranking of all n: the positives first, then
every other candidate ordered by a teacher: an embedder (all-MiniLM-L6-v2 by default, or sieve-embed) or BM25
itself. The sliding window cannot produce such labels (it only orders within windows); this does, for any n.

Sources (never a split that is reported):
- `scifact`: SciFact *train* claims over the SciFact corpus (`ScifactTrainLists`);
- `nq`: NQ-open oracle *train* questions over the pool of their gold Wikipedia passages (`PairLists`);
- `medquad`: MedQuAD questions over the pool of its answers (`PairLists`).
`MixedLists` draws lists from several sources with given weights.

**Foreign positives** (`distractors`): a list may also hold passages judged relevant to *other* queries of the
same source, labelled below every candidate of its own query. A model that learned which passages look like
answers, whatever the question (a passage prior), ranks them high and is corrected; only reading the query
against the passage ranks them low. Their place in the list is random (the list is usually shuffled anyway).
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("scifact", "nq", "medquad")


@dataclass
class RankingExample:
    query: str
    passages: list[str]  # in first-stage order, as the reranker will see them
    order: list[int]  # the label: indices into `passages`, most relevant first (a complete permutation)
    positives: int  # how many of the first entries of `order` are judged positives
    foreign: tuple[int, ...] = ()  # indices into `passages` of other queries' positives (labelled last)


@functools.cache
def load_teacher(name: str, home: Path, device: str):
    """One loaded teacher embedder per (name, home, device), shared by every source that orders with it."""
    from sieve.embedder import load_embedder

    from sieve.registry import resolve_embedder

    return load_embedder(resolve_embedder(name), home=home, device=device, dtype="float32")


class CandidateLists:
    """Queries with judged positives over a corpus -> `RankingExample`s of a requested size, built lazily (teacher
    scores cached)."""

    def __init__(self, corpus: dict[str, str], queries: dict[str, str], positives: dict[str, list[str]], *,
                 depth: int = 100, teacher: str = "all-minilm-l6-v2", home: Path | None = None, device: str = "cpu"):
        import bm25s
        import Stemmer

        self.corpus, self.doc_ids = corpus, list(corpus)
        self.qids = sorted(q for q, docs in positives.items() if any(d in corpus for d in docs))
        self.queries = queries
        self.positives = {q: [d for d in positives[q] if d in corpus] for q in self.qids}
        stemmer = Stemmer.Stemmer("english")
        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize([self.corpus[d] for d in self.doc_ids], stopwords="en", stemmer=stemmer,
                                       show_progress=False), show_progress=False)
        hits, scores = retriever.retrieve(
            bm25s.tokenize([self.queries[q] for q in self.qids], stopwords="en", stemmer=stemmer, show_progress=False),
            k=min(depth, len(self.doc_ids)), show_progress=False)
        self.bm25 = {q: [(self.doc_ids[j], float(s)) for j, s in zip(hits[i], scores[i])]
                     for i, q in enumerate(self.qids)}
        self.teacher_name = teacher
        self._teacher = None
        self._home, self._device = home, device
        self._doc_vecs: dict[str, object] = {}
        self._scores: dict[str, dict[str, float]] = {}  # qid -> doc -> teacher score (precomputed or loaded)

    def pick(self, rng: random.Random) -> str:
        """A query id to build the next training list from."""
        return rng.choice(self.qids)

    def __len__(self) -> int:
        return len(self.qids)

    def example(self, qid: str, n: int, rng: random.Random | None = None, distractors: int = 0) -> RankingExample:
        """A list of `n` for `qid`; `distractors` of its places go to other queries' positives (module doc)."""
        rng = rng or random.Random(qid)
        foreign = self.foreign_positives(qid, min(distractors, n - 1), rng) if distractors else []
        n -= len(foreign)
        ranked = [d for d, _ in self.bm25[qid]][:n]
        pos = self.positives[qid]
        missing = [d for d in pos if d not in ranked][:n]
        if missing:  # judged positives outside the top-n take the places of the lowest-ranked non-positives
            drop = {d for d in reversed(ranked) if d not in pos}
            drop = set([d for d in reversed(ranked) if d in drop][: len(missing)])
            ranked = [d for d in ranked if d not in drop]
            for d in missing:
                ranked.insert(rng.randrange(len(ranked) + 1), d)
            ranked = ranked[:n]
        teacher = self._teacher_scores(qid, ranked)
        label = sorted(range(len(ranked)), key=lambda i: (ranked[i] not in pos, -teacher[i], i))
        places = []
        for d in foreign:  # each at a random place; the label keeps naming the same passages
            at = rng.randrange(len(ranked) + 1)
            label = [i + (i >= at) for i in label]
            places = [j + (j >= at) for j in places]
            ranked.insert(at, d)
            label.append(at)
            places.append(at)
        return RankingExample(self.queries[qid], [self.corpus[d] for d in ranked], label,
                              sum(d in pos for d in ranked), tuple(places))

    def foreign_positives(self, qid: str, k: int, rng: random.Random) -> list[str]:
        """`k` distinct documents judged relevant to other queries, none relevant to `qid` nor among its
        BM25 candidates (so the label 'below every own candidate' is safe)."""
        if k <= 0:
            return []
        own = set(self.positives[qid]) | {d for d, _ in self.bm25[qid]}
        picked: list[str] = []
        for _ in range(50 * k):
            d = rng.choice(self.positives[rng.choice(self.qids)])
            if d not in own and d not in picked:
                picked.append(d)
                if len(picked) == k:
                    break
        return picked

    def candidates(self, qid: str) -> list[str]:
        """Every document an example of `qid` can hold: the BM25 top-depth and the judged positives."""
        ranked = [d for d, _ in self.bm25[qid]]
        seen = set(ranked)
        return ranked + [d for d in self.positives[qid] if d not in seen]

    def teacher_score_table(self, progress=None) -> dict[str, dict[str, float]]:
        """Score every candidate of every query with the teacher -> qid -> doc -> score."""
        for i, qid in enumerate(self.qids):
            self._teacher_scores(qid, self.candidates(qid))
            if progress:
                progress(i + 1, len(self.qids))
        return {q: {d: round(s, 6) for d, s in self._scores[q].items()} for q in self.qids}

    def save_teacher_scores(self, path: Path, progress=None) -> None:
        """Write `teacher_score_table` (JSON): a machine without the teacher's weights (or the time to run it)
        trains from this file (`load_teacher_scores`)."""
        import json

        path.write_text(json.dumps({"teacher": self.teacher_name, "scores": self.teacher_score_table(progress)}))

    def load_teacher_scores(self, path: Path) -> None:
        import json

        saved = json.loads(path.read_text())
        self.add_teacher_scores(saved["teacher"], saved["scores"], path)

    def add_teacher_scores(self, teacher: str, scores: dict[str, dict[str, float]], path: Path) -> None:
        if teacher != self.teacher_name:
            raise ValueError(f"{path} holds {teacher!r} scores, not the teacher {self.teacher_name!r}")
        for qid, by_doc in scores.items():
            self._scores.setdefault(qid, {}).update(by_doc)

    def _teacher_scores(self, qid: str, docs: list[str]) -> list[float]:
        known = self._scores.setdefault(qid, {})
        todo = [d for d in docs if d not in known]
        if todo:
            known.update(zip(todo, self._score(qid, todo)))
        return [known[d] for d in docs]

    def _score(self, qid: str, docs: list[str]) -> list[float]:
        if self.teacher_name == "bm25":
            by_doc = dict(self.bm25[qid])
            return [by_doc.get(d, 0.0) for d in docs]
        if self._teacher is None:
            self._teacher = load_teacher(self.teacher_name, self._home or Path("~/.cache/sieve/cache").expanduser(),
                                         self._device)
        todo = [d for d in docs if d not in self._doc_vecs]
        if todo:
            for d, v in zip(todo, self._teacher.encode_documents([self.corpus[d] for d in todo])):
                self._doc_vecs[d] = v
        q = self._teacher.encode_queries([self.queries[qid]])[0]
        return [float(self._doc_vecs[d] @ q) for d in docs]


class ScifactTrainLists(CandidateLists):
    """SciFact train claims (never the test split) over the SciFact corpus."""

    def __init__(self, data_root: Path, *, depth: int = 100, teacher: str = "all-minilm-l6-v2",
                 home: Path | None = None, device: str = "cpu"):
        from sieve.embedder.data import load_retrieval_set

        ds = load_retrieval_set(data_root, "scifact", split="train")
        positives = {q: [d for d, g in rel.items() if g > 0] for q, rel in ds.qrels.items()}
        super().__init__(ds.corpus, ds.queries, positives, depth=depth, teacher=teacher, home=home, device=device)


class PairLists(CandidateLists):
    """(query, positive passage) pairs: the corpus is the pool of all positives, so every other query's answer is a
    candidate negative, and BM25 picks the hard ones. Repeated queries (or passages) are one query (or document)."""

    def __init__(self, pairs, *, depth: int = 100, teacher: str = "all-minilm-l6-v2", home: Path | None = None,
                 device: str = "cpu"):
        docs: dict[str, str] = {}
        queries: dict[str, str] = {}
        positives: dict[str, list[str]] = {}
        for pair in pairs:
            d = docs.setdefault(pair.positive, f"d{len(docs)}")
            q = queries.setdefault(pair.query, f"q{len(queries)}")
            if d not in positives.setdefault(q, []):
                positives[q].append(d)
        super().__init__({d: text for text, d in docs.items()}, {q: text for text, q in queries.items()}, positives,
                         depth=depth, teacher=teacher, home=home, device=device)


def source_lists(name: str, data_root: Path, **kw) -> CandidateLists:
    """One named training source (see the module doc)."""
    from sieve.embedder.data import medquad_pairs, nq_train_pairs

    if name == "scifact":
        return ScifactTrainLists(data_root, **kw)
    if name == "nq":
        return PairLists(nq_train_pairs(data_root), **kw)
    if name == "medquad":
        return PairLists(medquad_pairs(data_root), **kw)
    raise ValueError(f"unknown training source {name!r}; choose from {', '.join(SOURCES)}")


class MixedLists:
    """Several sources, each drawn with its weight; query ids are `source/qid`."""

    def __init__(self, sources: dict[str, tuple[CandidateLists, float]]):
        if not sources or any(w <= 0 for _, w in sources.values()):
            raise ValueError("give at least one source, each with a positive weight")
        self.sources = {name: lists for name, (lists, _) in sources.items()}
        self.weights = {name: w for name, (_, w) in sources.items()}
        self.qids = [f"{name}/{q}" for name, lists in self.sources.items() for q in lists.qids]

    def pick(self, rng: random.Random) -> str:
        name = rng.choices(list(self.weights), weights=list(self.weights.values()))[0]
        return f"{name}/{self.sources[name].pick(rng)}"

    def example(self, qid: str, n: int, rng: random.Random | None = None, distractors: int = 0) -> RankingExample:
        name, _, q = qid.partition("/")
        return self.sources[name].example(q, n, rng, distractors)

    def save_teacher_scores(self, path: Path, progress=None) -> None:
        """Every source's teacher scores in one file (keys `source/qid`)."""
        import json

        teachers = {lists.teacher_name for lists in self.sources.values()}
        scores = {f"{name}/{q}": by_doc for name, lists in self.sources.items()
                  for q, by_doc in lists.teacher_score_table(progress).items()}
        path.write_text(json.dumps({"teacher": ",".join(sorted(teachers)), "scores": scores}))

    def load_teacher_scores(self, path: Path) -> None:
        import json

        saved = json.loads(path.read_text())
        for name, lists in self.sources.items():
            mine = {q[len(name) + 1:]: by_doc for q, by_doc in saved["scores"].items() if q.startswith(name + "/")}
            lists.add_teacher_scores(saved["teacher"], mine, path)
