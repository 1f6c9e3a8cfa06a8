"""bench/answer_nq.py's helpers: the corpus (one document per distinct passage), answers' first line, the summary."""

import pytest
from sieve.refrag.data import QAExample


@pytest.fixture
def anq(bench_module):
    return bench_module("answer_nq")


def test_corpus_has_one_document_per_distinct_passage(anq):
    a = QAExample("1", "q1?", ["x"], ["Title\ngold one", "shared negative"], [0])
    b = QAExample("2", "q2?", ["y"], ["shared negative", "Other\ngold two"], [1])
    docs = anq.corpus([a, b])
    assert sorted(docs.values()) == ["Other\ngold two", "Title\ngold one", "shared negative"]
    assert anq.doc_id("shared negative") in docs and len(set(docs)) == 3
    assert anq.doc_id("gold one") != anq.doc_id("gold two")


def test_first_line_and_summary(anq):
    assert anq.first_line("\n  Paris \nbecause ...") == "Paris"
    rows = [{"em": True, "acc": True, "gold_retrieved": True, "ttft_s": 0.5, "positions": 100, "full_tokens": 300,
             "expanded": 2},
            {"em": False, "acc": True, "gold_retrieved": False, "ttft_s": 1.5, "positions": 200, "full_tokens": 500,
             "expanded": 4}]
    got = anq.score(rows)
    assert got == {"questions": 2, "exact_match": 0.5, "accuracy": 1.0, "gold_retrieved": 0.5, "ttft_ms": 1000.0,
                   "prompt_positions": 150.0, "full_prompt_tokens": 400.0, "expanded_blocks": 3.0}
