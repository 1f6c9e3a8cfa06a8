"""`sieve eval reranker` end to end on a tiny BEIR-format set and a tiny random backbone: first-stage row, every
mode's row with zero format faults, and top_k=10 giving the complete rankings' nDCG@10 with less decoding."""

import pytest
from sieve.backbone import ModelArgs, load_backbone
from sieve.reranker import Reranker
from sieve.reranker.eval import evaluate

from .tiny_files import write_beir, write_tiny_gguf

WORDS = "aspirin heart risk study patients cancer blood level increase effect cell protein gene".split()


@pytest.fixture(scope="module")
def reranker(tmp_path_factory):
    args = ModelArgs.from_name("tiny")
    args.max_seq_len = 4096
    path = tmp_path_factory.mktemp("rre") / "tiny.gguf"
    write_tiny_gguf(path, args)
    backbone = load_backbone(path, home=tmp_path_factory.mktemp("home"), device="cpu", dtype="float32")
    return Reranker(backbone, max_passage_tokens=24)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    docs = {f"d{i}": " ".join(WORDS[(i * j) % len(WORDS)] for j in range(1, 9)) for i in range(40)}
    queries = {"q1": "aspirin heart risk", "q2": "cancer blood level", "q3": "protein gene cell"}
    qrels = [("q1", "d3", 1), ("q1", "d7", 1), ("q2", "d11", 1), ("q3", "d20", 2), ("q3", "d5", 1)]
    write_beir(root / "retrieval" / "scifact", docs, queries, qrels, split="test")
    return root


def run(reranker, data_root, tmp_path, **kw):
    return list(evaluate(reranker, ["scifact"], data_root=data_root, home=tmp_path, device="cpu", dtype="float32",
                         depth=25, **kw))


def test_eval_rows_and_top_k_keeps_ndcg_at_10(reranker, data_root, tmp_path):
    complete = run(reranker, data_root, tmp_path, modes=("sliding", "full", "first"))
    assert [r["mode"] for r in complete] == ["first-stage", "sliding", "full", "first"]
    assert all(r["queries"] == 3 and 0.0 <= r["ndcg@10"] <= 1.0 for r in complete)
    for r in complete[1:3]:
        assert (r["wrong_format_rate"], r["repetition_rate"], r["missing_rate"]) == (0.0, 0.0, 0.0)
        assert r["answers"] == 3 * (2 if r["mode"] == "sliding" else 1)  # 25 passages: two windows
    top = run(reranker, data_root, tmp_path, modes=("sliding", "full"), top_k=10)
    for full_row, top_row in zip(complete[:3], top):
        assert top_row["mode"] == full_row["mode"] and top_row["top_k"] == 10
        assert top_row["ndcg@10"] == full_row["ndcg@10"]  # greedy decoding: the same top 10
        if top_row["mode"] != "first-stage":
            assert top_row["missing_rate"] == 0.0 and top_row["wrong_format_rate"] == 0.0
            assert top_row["tokens_per_query"] < full_row["tokens_per_query"]


def test_list_options_take_commas_or_repeats():
    from sieve.reranker.cli import _items

    assert _items(["bm25,sieve-embed", " all-minilm-l6-v2 ", "full,"]) == ["bm25", "sieve-embed", "all-minilm-l6-v2",
                                                                          "full"]
    assert _items(None) == [] and _items([]) == []


def test_fusion_rows_fuse_the_mode_with_the_first_stage(reranker, data_root, tmp_path, monkeypatch):
    """`<mode>+rrf` rows come from the same calls: a reranker that returns the first-stage order fuses to that same
    order; one that reverses it fuses to something else. (The tiny corpus has tied BM25 scores, which trec_eval orders
    by document id, so the identity ranking is compared with the mode's row, not the first stage's.)"""
    from sieve.reranker.listwise import RankResult

    def scripted(reverse):
        def rank(query, passages, *, mode="full", top_k=None, fuse=None):
            assert fuse is False  # each mode row is the mode alone, whatever the model's default
            order = list(range(len(passages)))[::-1] if reverse else list(range(len(passages)))
            return RankResult(order, [float(len(order) - r) for r in range(len(order))], mode)
        return rank

    monkeypatch.setattr(reranker, "rank", scripted(False))
    same = run(reranker, data_root, tmp_path, modes=("first",), fusion=True)
    assert [r["mode"] for r in same] == ["first-stage", "first", "first+rrf"]
    assert same[1]["ndcg@10"] == same[2]["ndcg@10"]
    assert same[2]["seconds_per_query"] == same[1]["seconds_per_query"]  # no second model call

    monkeypatch.setattr(reranker, "rank", scripted(True))
    rev = run(reranker, data_root, tmp_path, modes=("first",), fusion=True)
    assert rev[1]["ndcg@10"] != same[1]["ndcg@10"] and rev[2]["ndcg@10"] != rev[1]["ndcg@10"]


def test_prior_check_tells_a_passage_prior_from_a_query_reader(reranker, data_root, tmp_path, monkeypatch):
    """A scorer that ignores the query correlates 1.0 with itself under another query; one whose scores flip with
    the query does not. Rows of decoded modes carry no prior_correlation."""
    from sieve.reranker.listwise import RankResult

    def scripted(reads_query):
        def rank(query, passages, *, mode="full", top_k=None, fuse=None):
            up = not reads_query or "aspirin" in query  # q1 scores one way, q2 and q3 the other
            scores = {i: float(i if up else -i) for i in range(len(passages))}
            order = sorted(scores, key=lambda i: -scores[i])[: top_k or len(passages)]
            return RankResult(order, [scores[i] for i in order], mode)
        return rank

    monkeypatch.setattr(reranker, "rank", scripted(False))
    prior = run(reranker, data_root, tmp_path, modes=("inline",), prior_check=True)
    assert prior[1]["prior_correlation"] == 1.0
    # with top_k the check still correlates every passage's score, not the top k's against zeros
    assert run(reranker, data_root, tmp_path, modes=("inline",), prior_check=True, top_k=3)[1][
        "prior_correlation"] == 1.0
    monkeypatch.setattr(reranker, "rank", scripted(True))
    reads = run(reranker, data_root, tmp_path, modes=("first",), prior_check=True)
    assert reads[1]["prior_correlation"] == round(-1 / 3, 4)  # q1~q2: -1, q2~q3: +1, q3~q1: -1
    monkeypatch.undo()
    decoded = run(reranker, data_root, tmp_path, modes=("full",), prior_check=True)
    assert "prior_correlation" not in decoded[1]


def test_spearman_and_by_passage():
    from sieve.reranker.eval import by_passage, spearman

    assert by_passage([2, 0, 1], [3.0, 2.0, 1.0], 3) == [2.0, 1.0, 3.0]
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 1, 1], [1, 2, 3]) == 0.0


def test_likelihood_rows_score_every_candidate_for_fusion(reranker, data_root, tmp_path):
    """The query-likelihood mode is a score mode: with top_k its row and its fused row are those of the complete
    scores (fusion reads every passage's rank), and it decodes nothing."""
    complete = run(reranker, data_root, tmp_path, modes=("likelihood",), fusion=True)
    top = run(reranker, data_root, tmp_path, modes=("likelihood",), fusion=True, top_k=10)
    assert [r["mode"] for r in complete] == ["first-stage", "likelihood", "likelihood+rrf"]
    for a, b in zip(complete, top):
        assert a["ndcg@10"] == b["ndcg@10"]
    row = complete[1]
    assert "answers" not in row and row["tokens_per_query"] > 0 and row["passage_cap"] == 24
