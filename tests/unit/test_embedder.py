"""Embedder behaviour on a tiny random backbone: attention mode, pooling, instructions, precisions, batching."""

import numpy as np
import pytest
import torch
from sieve.embedder import (
    Embedder,
    InputTooLong,
    Int8Ranges,
    LLMEncoder,
    from_binary,
    hamming_search,
    pool,
    rescore,
)
from sieve.embedder.batching import default_batch_tokens, token_budget_batches
from torch.testing import assert_close

from .tiny_files import load_tiny_backbone

TEXTS = ["hello world", "the longest text of them all, with many more words than the others in here",
         "short", "hello there, world of retrieval"]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory):
    return load_tiny_backbone(tmp_path_factory)


@pytest.fixture
def embedder(backbone):
    return Embedder(LLMEncoder(backbone, name="tiny", max_length=64), query_instruction="Query: ")


def test_bidirectional_changes_early_token_states(backbone, embedder):
    ids, _ = embedder.encoder.prepare("hello world of retrieval", "", True)
    t = torch.tensor([ids])
    bi = embedder.encoder.forward(t, torch.ones_like(t))
    causal = backbone.model(t, mode="causal").hidden_states
    assert not torch.allclose(bi[0, 0], causal[0, 0], atol=1e-4)  # the first token now sees the rest
    assert_close(bi[0, -1], backbone.model(t, mode="bidirectional").hidden_states[0, -1])


@pytest.mark.parametrize("pooling", ["mean", "last", "weighted_mean"])
def test_instruction_tokens_are_seen_but_not_pooled(backbone, embedder, pooling):
    tok = backbone.tokenizer
    instr, text = "Query: ", "hello world"
    got = embedder.encode([text], instruction=instr, pooling=pooling, normalize=False)
    ids = tok.encode(instr) + tok.encode(text) + tok.eos_ids[:1]
    n_instr = len(tok.encode(instr))
    hidden = backbone.model(torch.tensor([ids]), mode="bidirectional").hidden_states[0]
    text_states = hidden[n_instr:]  # states computed WITH the instruction in context
    want = {"mean": text_states.mean(0), "last": text_states[-1],
            "weighted_mean": (text_states * torch.arange(1, len(text_states) + 1)[:, None]).sum(0)
            / sum(range(1, len(text_states) + 1))}[pooling]
    np.testing.assert_allclose(got[0], want.numpy(), atol=1e-5, rtol=1e-5)
    without = embedder.encode([text], pooling=pooling, normalize=False)
    assert not np.allclose(got, without, atol=1e-4)  # the instruction did change the text's states
    assert embedder.encode_queries([text], pooling=pooling, normalize=False) == pytest.approx(got)


def test_one_text_alone_equals_inside_a_batch_of_longer_texts(embedder):
    batched = embedder.encode(TEXTS, instruction="Query: ")
    for i, text in enumerate(TEXTS):
        np.testing.assert_allclose(embedder.encode([text], instruction="Query: ")[0], batched[i], atol=1e-5)
    embedder.batch_tokens = 20  # many small batches, different grouping: same results, same order
    np.testing.assert_allclose(embedder.encode(TEXTS, instruction="Query: "), batched, atol=1e-5)


def test_matryoshka_dim_truncates_then_normalizes(embedder):
    full = embedder.encode(TEXTS, normalize=False)
    small = embedder.encode(TEXTS, dim=16)
    assert small.shape == (4, 16) and small.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(small, full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True), atol=1e-6)
    with pytest.raises(ValueError, match="dim"):
        embedder.encode(TEXTS, dim=65)


def test_int8_needs_calibration_then_round_trips(embedder):
    with pytest.raises(ValueError, match="calibrat"):
        embedder.encode(TEXTS, precision="int8")
    embedder.calibrate(TEXTS * 3 + ["more text", "and another piece of text", "w" * 20])
    q = embedder.encode(TEXTS, precision="int8")
    assert q.shape == (4, 64) and q.dtype == np.int8
    ranges = embedder.int8_ranges()
    back = ranges.dequantize(q)
    ref = embedder.encode(TEXTS)
    step = (ranges.hi - ranges.lo) / 255
    inside = (ref >= ranges.lo) & (ref <= ranges.hi)
    assert np.all(np.abs(back - ref)[inside] <= (step / 2 + 1e-6)[np.nonzero(inside)[1]])
    q16 = embedder.encode(TEXTS, precision="int8", dim=16)
    assert q16.shape == (4, 16) and embedder.int8_ranges(16).lo.shape == (16,)


def test_binary_packs_sign_bits_and_rescoring_recovers_order(embedder):
    ref = embedder.encode(TEXTS)
    bits = embedder.encode(TEXTS, precision="binary")
    assert bits.shape == (4, 8) and bits.dtype == np.uint8
    np.testing.assert_array_equal(from_binary(bits, 64), np.where(ref > 0, 1.0, -1.0))
    ids, dist = hamming_search(bits, bits, k=2)
    assert ids[:, 0].tolist() == [0, 1, 2, 3] and (dist[:, 0] == 0).all()
    scores = rescore(ref, bits, "binary", dim=64)
    assert scores.shape == (4, 4) and (scores.argmax(1) == np.arange(4)).all()
    embedder.calibrate(TEXTS * 2)
    s8 = rescore(ref, embedder.encode(TEXTS, precision="int8"), "int8", ranges=embedder.int8_ranges())
    np.testing.assert_allclose(s8, ref @ ref.T, atol=0.05)


def test_empty_inputs_and_over_long_texts(embedder):
    assert embedder.encode([]).shape == (0, 64)
    assert embedder.encode([], precision="binary").shape == (0, 8)
    empty = embedder.encode([""])
    assert np.isfinite(empty).all() and abs(np.linalg.norm(empty) - 1) < 1e-5  # the end token alone
    long_text = "hello world " * 100
    cut = embedder.encode([long_text])
    assert cut.shape == (1, 64)
    with pytest.raises(InputTooLong, match="64"):
        embedder.encode([long_text], truncate=False)
    with pytest.raises(TypeError, match="list"):
        embedder.encode("not a list")
    with pytest.raises(ValueError, match="pooling"):
        embedder.encode(TEXTS, pooling="max")
    with pytest.raises(ValueError, match="precision"):
        embedder.encode(TEXTS, precision="fp8")


def test_pool_modes_on_known_values():
    h = torch.tensor([[[1.0], [3.0], [5.0], [100.0]]])
    m = torch.tensor([[0, 1, 1, 0]])  # position 0 is an instruction, position 3 padding
    assert pool(h, m, "mean").item() == 4.0
    assert pool(h, m, "last").item() == 5.0
    assert pool(h, m, "weighted_mean").item() == pytest.approx((3 * 1 + 5 * 2) / 3)


def test_token_budget_batches_sorted_within_budget_and_complete():
    lengths = [5, 50, 7, 49, 3, 200, 8]
    batches = token_budget_batches(lengths, budget=100)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 100
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat, reverse=True)


def test_token_budget_batches_compute_the_fewest_positions_a_brute_force_finds():
    """Against every split of the length-sorted inputs: the chosen batches compute the fewest padded positions plus
    `overhead` a forward, within the budget."""
    import itertools
    import random

    def cost(batches, lengths, overhead):
        return sum(len(b) * max(lengths[i] for i in b) + overhead for b in batches)

    rng = random.Random(0)
    for _ in range(60):
        n, budget, overhead = rng.randint(1, 9), rng.choice([40, 100, 10_000]), rng.choice([0, 8, 64])
        lengths = [rng.randint(1, 40) for _ in range(n)]
        got = token_budget_batches(lengths, budget, overhead=overhead)
        assert sorted(i for b in got for i in b) == list(range(n))
        assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= budget for b in got)
        order = sorted(range(n), key=lambda i: lengths[i])
        splits = [_split(order, cuts) for cuts in itertools.product([0, 1], repeat=n - 1)]
        best = min(cost(parts, lengths, overhead) for parts in splits
                   if all(len(p) == 1 or len(p) * max(lengths[i] for i in p) <= budget for p in parts))
        assert cost(got, lengths, overhead) == best, (lengths, budget, overhead, got)
    # padding costs more than a forward here: 8 short texts and 2 long ones go in two batches, not one
    assert sorted(map(sorted, token_budget_batches([4] * 8 + [300] * 2, 4000))) == [[0, 1, 2, 3, 4, 5, 6, 7], [8, 9]]
    # and less here: texts of 10 and 12 tokens share one
    assert token_budget_batches([10, 12, 10, 12], 4000) == [[3, 1, 2, 0]]


def _split(order, cuts):
    parts, current = [], [order[0]]
    for i, cut in zip(order[1:], cuts):
        if cut:
            parts.append(current)
            current = []
        current.append(i)
    return parts + [current]


def test_batch_budget_defaults_by_device(backbone, embedder):
    assert default_batch_tokens("cpu") == 2048 and default_batch_tokens(torch.device("cuda", 1)) == 8192
    assert embedder.batch_tokens == 2048  # the fixture's encoder is on the CPU
    assert Embedder(embedder.encoder, batch_tokens=300).batch_tokens == 300


def test_int8_ranges_fit_trims_outliers():
    x = np.random.default_rng(0).normal(size=(1000, 3)).astype(np.float32)
    x[0] = 1000
    r = Int8Ranges.fit(x)
    assert (r.hi < 10).all() and (r.lo > -10).all()
    assert r.quantize(np.array([[1000.0, -1000.0, 0.0]], dtype=np.float32)).tolist() == [[127, -128, r.quantize(
        np.zeros((1, 3), np.float32))[0, 2]]]
