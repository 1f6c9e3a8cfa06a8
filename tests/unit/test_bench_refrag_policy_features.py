"""bench/refrag_policy_features.py's pure helpers: target-free block features, the fitted scorer, tail selection."""

import pytest
import torch


@pytest.fixture
def pf(bench_module):
    return bench_module("refrag_policy_features")


class Vocab:
    words = ["the", " Paris", " 1998", " river", ",", " of"]
    vocab_size = len(words)

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)


def test_token_flags_read_the_token_text(pf):
    flags = pf.TokenFlags(Vocab())
    assert flags.cap.tolist() == [0, 1, 0, 0, 0, 0]
    assert flags.digit.tolist() == [0, 0, 1, 0, 0, 0]
    assert flags.alpha.tolist() == [0, 1, 0, 1, 0, 0]  # alphabetic and 4+ characters


def test_features_of_each_block(pf):
    flags = pf.TokenFlags(Vocab())
    blocks = [[1, 4, 3], [0, 5, 0], [2, 4, 5], [1, 3, 0]]  # block 0 shares Paris and river with the last block
    vectors = torch.eye(4)
    vectors[1] = vectors[3]  # block 1 points where the last block does
    x = pf.features(blocks, vectors, flags)
    col = {name: j for j, name in enumerate(pf.FEATURES)}
    assert x.shape == (4, len(pf.FEATURES))
    assert x[:, col["position"]].tolist() == pytest.approx([0, 1 / 3, 2 / 3, 1])
    assert x[:, col["cosine to last block"]].tolist() == pytest.approx([0, 1, 0, 1])
    assert x[:, col["in last block"]].tolist() == pytest.approx([1, 0, 0, 1])
    assert x[:, col["repeated in context"]].tolist() == pytest.approx([1, 0, 0, 1])
    assert x[:, col["digits"]].tolist() == pytest.approx([0, 0, 1 / 3, 0])
    assert x[:, col["is last"]].tolist() == [0, 0, 0, 1]
    assert x[:, col["is second last"]].tolist() == [0, 0, 1, 0]


def test_fitted_scorer_finds_the_feature_that_carries_the_gain(pf):
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(16, 5, generator=g) for _ in range(24)]
    gs = [x[:, 3] * 0.1 for x in xs]  # the gain is feature 3; position (column 0) is noise
    cv = pf.cross_validate(xs, gs)
    assert cv["learned"] > 0.9 * cv["oracle"]
    assert cv["learned"] > cv["recency"] + 0.05


def test_tail_plus_keeps_three_quarters_at_the_end(pf):
    scores = torch.tensor([5.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0, -1.0, -1.0, -1.0, -1.0, -1.0])
    assert pf.tail_plus(scores, 4) == {9, 10, 11, 0}
    assert pf.top_gain(torch.tensor([0.0, 2.0, 1.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]), p=0.5) == 3.0
