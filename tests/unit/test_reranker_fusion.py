"""Reciprocal rank fusion of the reranker's order with the first stage's."""

import pytest
from sieve.reranker.fusion import fuse_with_input_order, rrf


def test_rrf_sums_reciprocal_ranks_and_breaks_ties_by_input_order():
    # 0 and 2: 1/61 + 1/63 = 0.03227 each; 1: 2/62 = 0.03226
    order, scores = rrf([[0, 1, 2], [2, 1, 0]], 3)
    assert order == [0, 2, 1]
    assert scores[0] == pytest.approx(1 / 61 + 1 / 63) and scores[2] == pytest.approx(2 / 62)
    assert rrf([[0, 1, 2], [2, 1, 0]], 3, k=0)[0] == [0, 2, 1]  # 1 + 1/3 against 1/2 + 1/2


def test_a_partial_order_only_lifts_what_it_lists():
    assert rrf([[0, 1, 2, 3], [3]], 4)[0] == [3, 0, 1, 2]
    assert fuse_with_input_order([], 3)[0] == [0, 1, 2]  # no model opinion: the first stage
    assert fuse_with_input_order([2, 1, 0, 3], 4)[0] == [0, 2, 1, 3]  # 1/61+1/63 > 2/62 > 1/61... ; 3 last


def test_rrf_rejects_bad_input():
    with pytest.raises(ValueError, match="outside 0..2"):
        rrf([[0, 3]], 3)
    with pytest.raises(ValueError, match=">= 0"):
        rrf([[0]], 1, k=-1)
