"""Reciprocal rank fusion of the reranker's order with the first stage's (Cormack, Clarke & Buettcher, SIGIR 2009).

A small reranker and a first stage make different mistakes: the 135M backbone's inline scores learned relevance
(train.py) but on their own stay under BM25 on SciFact test. RRF adds, for every passage, 1 / (k + rank) from each
ranking (rank from 1) and sorts by the sum: it needs no score calibration (BM25 scores, cosines and logit
differences live on different scales) and no weight tuned on a test set. k = 60 is the paper's constant.

The first stage's ranking is the order the passages came in: the caller lists them best first, as `Search` and
the evaluation do.
"""

from __future__ import annotations

RRF_K = 60


def rrf(orders: list[list[int]], n: int, k: int = RRF_K) -> tuple[list[int], list[float]]:
    """Fuse complete or partial orders of indices 0..n-1 -> (fused order of all n, fused scores in that order).

    An index missing from an order gets nothing from it (a top-k answer says nothing about the rest). Ties keep
    the input order (the first stage's)."""
    if k < 0:
        raise ValueError(f"the RRF constant must be >= 0, got {k}")
    score = [0.0] * n
    for order in orders:
        for rank, i in enumerate(order, start=1):
            if not 0 <= i < n:
                raise ValueError(f"index {i} is outside 0..{n - 1}")
            score[i] += 1.0 / (k + rank)
    fused = sorted(range(n), key=lambda i: (-score[i], i))
    return fused, [score[i] for i in fused]


def fuse_with_input_order(order: list[int], n: int, k: int = RRF_K) -> tuple[list[int], list[float]]:
    """The reranker's `order` fused with the input order 0, 1, ..., n-1 (the first stage's ranking)."""
    return rrf([list(range(n)), order], n, k)
