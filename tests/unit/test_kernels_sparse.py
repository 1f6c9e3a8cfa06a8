"""Block-sparse attention on CPU: the torch reference, pattern estimation, and the backbone's `sparse` mode."""

import pytest
import torch
import torch.nn.functional as F
from sieve.backbone import ATTENTION_MODES
from sieve.backbone.attention import AttentionContext
from sieve.kernels import SparseAttention, SparseConfig, block_sparse_attention_reference, estimate_block_mask
from sieve.kernels.block_sparse_attention import causal_block_mask, expand_block_mask
from sieve.kernels.sparse_attention import register_sparse_attention
from torch.testing import assert_close

from .helpers import random_ids, tiny_model


def qkv(b, h, hkv, tq, tk, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, tq, d, generator=g), torch.randn(b, hkv, tk, d, generator=g),
            torch.randn(b, hkv, tk, d, generator=g))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h,hkv", [(4, 4), (9, 3), (8, 1)])
@pytest.mark.parametrize("t", [1, 17, 100])
def test_reference_with_full_mask_is_dense_attention(causal, h, hkv, t):
    q, k, v = qkv(2, h, hkv, t, t)
    nb = -(-t // 16)
    mask = torch.ones(2, h, nb, nb, dtype=torch.bool)
    got = block_sparse_attention_reference(q, k, v, mask, causal=causal, block_size=16, chunk_blocks=2)
    assert_close(got, F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True),
                 atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_reference_follows_the_backbone_mask_with_padding_and_offset(causal):
    q, k, v = qkv(2, 6, 2, 30, 41)
    padding = torch.ones(2, 41, dtype=torch.bool)
    padding[1, :9] = False
    ctx = AttentionContext(causal=causal, q_len=30, q_offset=11, key_padding=padding)
    mask = torch.ones(2, 6, 2, 3, dtype=torch.bool)
    got = block_sparse_attention_reference(q, k, v, mask, causal=causal, q_offset=11, key_padding=padding,
                                           block_size=16)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, enable_gqa=True)
    assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reference_skips_exactly_the_masked_blocks():
    q, k, v = qkv(1, 3, 3, 50, 50)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(1, 3, 4, 4, generator=g) > 0.5
    mask[..., 0] = True  # no empty rows here (they are tested below)
    dense = expand_block_mask(mask, 50, 50, 16) & torch.ones(50, 50, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    got = block_sparse_attention_reference(q, k, v, mask, causal=True, block_size=16)
    assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reference_empty_rows_are_zero():
    q, k, v = qkv(1, 2, 2, 20, 20)
    mask = torch.zeros(1, 2, 2, 2, dtype=torch.bool)
    mask[0, 0, 1, 1] = True  # head 0: only the second query block has keys; head 1: nothing
    got = block_sparse_attention_reference(q, k, v, mask, causal=True, block_size=16)
    assert torch.isfinite(got).all()
    assert (got[0, 1] == 0).all() and (got[0, 0, :16] == 0).all() and (got[0, 0, 16:] != 0).any()


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_offset", [0, 24])
def test_estimate_keeps_sink_and_local_and_never_future_blocks(causal, q_offset):
    q, k, _ = qkv(2, 6, 2, 200, 200 + q_offset, seed=1)
    cfg = SparseConfig(block_size=16, gamma=0.3, last_q=16)
    mask, vs = estimate_block_mask(q, k, causal=causal, q_offset=q_offset, config=cfg)
    n_q, n_k = 13, -(-(200 + q_offset) // 16)
    assert mask.shape == (2, 6, n_q, n_k) and vs.shape == (2, 6)
    assert mask[..., 0].all()  # sink
    q_block = (q_offset + torch.arange(n_q) * 16) // 16
    assert mask[..., torch.arange(n_q), q_block].all()  # the diagonal (local) block
    if causal:
        assert not (mask & ~causal_block_mask(200, 200 + q_offset, 16, q_offset)).any()
    assert mask.float().mean() < 0.9  # gamma 0.3 on random data leaves blocks out


def test_gamma_one_keeps_every_allowed_block():
    q, k, _ = qkv(1, 4, 2, 150, 150, seed=2)
    mask, _ = estimate_block_mask(q, k, causal=True, config=SparseConfig(block_size=16, gamma=1.0, last_q=16))
    assert torch.equal(mask[0, 0], causal_block_mask(150, 150, 16))
    assert torch.equal(mask, causal_block_mask(150, 150, 16).expand_as(mask))


def test_planted_vertical_line_is_found_and_the_rest_is_sparse():
    """Every query attends to one key column (a 'vertical' line): its block is kept for all later query blocks."""
    t, d, bs, col = 512, 16, 16, 200
    g = torch.Generator().manual_seed(3)
    u = torch.randn(d, generator=g)
    q = (u * 3 + 0.3 * torch.randn(1, 2, t, d, generator=g))
    k = 0.3 * torch.randn(1, 1, t, d, generator=g)
    k[0, 0, col] = u * 3
    mask, vs = estimate_block_mask(q, k, causal=True, config=SparseConfig(block_size=bs, gamma=0.9, last_q=32))
    later = torch.arange(col // bs, t // bs)
    assert mask[0, :, later, col // bs].all()
    density = mask.float().sum() / (2 * causal_block_mask(t, t, bs).sum())
    assert density < 0.35


def test_sparse_mode_in_a_tiny_model():
    causal_fn, bidir_fn = register_sparse_attention(SparseConfig(block_size=16, gamma=1.0, min_length=0, last_q=16))
    try:
        assert "sparse" in ATTENTION_MODES and ATTENTION_MODES["sparse"].causal
        assert not ATTENTION_MODES["sparse-bidirectional"].causal
        model = tiny_model()
        ids = random_ids(2, 150)
        mask = torch.ones_like(ids)
        mask[1, :21] = 0
        with torch.no_grad():
            for mode, fn in (("causal", causal_fn), ("bidirectional", bidir_fn)):
                for am in (None, mask):
                    want = model(ids, attention_mask=am, mode=mode).logits
                    got = model(ids, attention_mask=am, mode=f"sparse{'' if mode == 'causal' else '-bidirectional'}")
                    assert_close(got.logits, want, atol=1e-4, rtol=1e-4)
                assert fn.stats.sparse_calls > 0 and fn.stats.density == 1.0
        # a sparse config really changes the result, and decoding (1 query) stays dense
        causal_fn.config = SparseConfig(block_size=16, gamma=0.2, min_length=0, last_q=16, local_blocks=1)
        with torch.no_grad():
            sparse = model(ids, mode="sparse").logits
            dense = model(ids, mode="causal").logits
        assert not torch.allclose(sparse, dense, atol=1e-3) and causal_fn.stats.density < 1.0
        before = causal_fn.stats.dense_calls
        from sieve.backbone import generate

        out = generate(model, [random_ids(1, 40)[0].tolist()], max_new_tokens=3)
        assert len(out[0]) == 3 and causal_fn.stats.dense_calls == before  # generate uses mode="causal"
    finally:
        ATTENTION_MODES.pop("sparse", None)
        ATTENTION_MODES.pop("sparse-bidirectional", None)


def test_short_inputs_take_the_dense_path_exactly():
    fn = SparseAttention(SparseConfig(min_length=1000))
    q, k, v = qkv(1, 9, 3, 300, 300)
    ctx = AttentionContext(causal=True, q_len=300, q_offset=0, key_padding=None)
    assert torch.equal(fn(q, k, v, ctx), F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True))
    assert fn.stats.dense_calls == 1 and fn.stats.sparse_calls == 0


def test_sparse_by_default_makes_generation_prefill_sparse_and_restores_the_modes():
    from sieve.backbone import generate
    from sieve.kernels import sparse_by_default

    model = tiny_model()
    prompt = random_ids(1, 120)[0].tolist()
    dense_out = generate(model, [prompt], max_new_tokens=4)
    before = dict(ATTENTION_MODES)
    with sparse_by_default(SparseConfig(block_size=16, gamma=1.0, min_length=0, last_q=16)) as fn:
        assert generate(model, [prompt], max_new_tokens=4) == dense_out  # gamma 1: every block, same tokens
        assert fn.stats.sparse_calls == model.args.n_layers  # the prefill, once per layer
        assert fn.stats.dense_calls == 0  # decode steps attend in Transformer.decode_step, not through the mode
    assert ATTENTION_MODES == before
