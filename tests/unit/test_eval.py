"""Evaluation plumbing: trec_eval scoring (pytrec_eval), BM25 runs and dense runs on a tiny hand-made set."""

import numpy as np
import pytest
from sieve.embedder.data import RetrievalSet
from sieve.embedder.eval import bm25_run, dense_run, score

DS = RetrievalSet(
    name="toy",
    corpus={"d1": "cats purr and sleep all day", "d2": "rockets fly to orbit", "d3": "dogs bark at cats"},
    queries={"q1": "why do cats purr", "q2": "how do rockets reach orbit"},
    qrels={"q1": {"d1": 1}, "q2": {"d2": 2}},
)


def test_perfect_and_reversed_runs():
    assert score(DS, {"q1": {"d1": 2.0, "d3": 1.0}, "q2": {"d2": 1.0}})["ndcg@10"] == pytest.approx(1.0)
    worse = score(DS, {"q1": {"d3": 2.0, "d1": 1.0}, "q2": {"d2": 1.0}})
    assert worse["mrr@10"] == pytest.approx((0.5 + 1.0) / 2)
    assert score(DS, {})["ndcg@10"] == 0.0  # queries without results count as zero, not skipped


def test_bm25_ranks_the_matching_document_first():
    run = bm25_run(DS)
    assert max(run["q1"], key=run["q1"].get) == "d1" and max(run["q2"], key=run["q2"].get) == "d2"
    reranked = RetrievalSet(**{**DS.__dict__, "candidates": {"q1": ["d3", "d1"], "q2": ["d2"]}})
    assert bm25_run(reranked)["q1"] == {"d3": 2.0, "d1": 1.0}  # the shipped first-stage order


class KeywordEmbedder:
    """Bag-of-keywords vectors: enough to check the search plumbing end to end."""

    name = "kw"
    words = ["cats", "purr", "rockets", "orbit", "dogs"]

    def _vec(self, texts):
        v = np.array([[t.count(w) for w in self.words] for t in texts], dtype=np.float32) + 1e-3
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    encode_documents = encode_queries = _vec


def test_dense_run_full_corpus_and_candidates():
    run = dense_run(KeywordEmbedder(), DS)
    assert score(DS, run)["ndcg@10"] == pytest.approx(1.0)
    cands = RetrievalSet(**{**DS.__dict__, "candidates": {"q1": ["d2", "d3"], "q2": ["d2"]}})
    run = dense_run(KeywordEmbedder(), cands)
    assert set(run["q1"]) == {"d2", "d3"}  # only candidates are scored


def test_cutoffs_and_ties_follow_trec_eval():
    """MRR@10 and nDCG@10 see only the top 10 (a hit at rank 11 scores 0); recall@100 counts it. Tied scores are
    ordered by document id, descending, in every measure."""
    corpus = {f"d{i:02d}": "x" for i in range(12)}
    ds = RetrievalSet(name="cut", corpus=corpus, queries={"q": "x"}, qrels={"q": {"d00": 1}})
    eleventh = {f"d{i:02d}": float(20 - i) for i in range(1, 11)} | {"d00": 0.5}
    got = score(ds, {"q": eleventh})
    assert got["mrr@10"] == 0.0 and got["ndcg@10"] == 0.0 and got["recall@100"] == 1.0
    tied = score(ds, {"q": {"d00": 1.0, "d05": 1.0}})  # d05 > d00: the hit is second
    assert tied["mrr@10"] == pytest.approx(0.5)
    # all tied: d00 is eleventh, cut from the top 10
    tied_top10 = score(ds, {"q": {f"d{i:02d}": 1.0 for i in range(11)}})
    assert tied_top10["mrr@10"] == 0.0 and tied_top10["recall@100"] == 1.0
    assert tied["ndcg@10"] == pytest.approx(1 / np.log2(3))
