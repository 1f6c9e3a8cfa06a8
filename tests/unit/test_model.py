"""Decoder behaviour on tiny random configs: masks, padding, cache, inputs_embeds, attention hook."""

import pytest
import torch
from sieve.backbone import ATTENTION_MODES, register_attention_mode
from sieve.backbone.attention import sdpa_attention
from torch.testing import assert_close

from .helpers import random_ids, tiny_model

PRESETS = ["tiny", "tiny-qwen2"]


@pytest.mark.parametrize("preset", PRESETS)
def test_causal_mask_blocks_the_future_and_bidirectional_sees_it(preset):
    model = tiny_model(preset)
    ids = random_ids(1, 12)
    changed = ids.clone()
    changed[0, 8] = (ids[0, 8] + 7) % 250 + 3
    for mode, prefix_same in [("causal", True), ("bidirectional", False)]:
        a = model(ids, mode=mode).hidden_states
        b = model(changed, mode=mode).hidden_states
        same = torch.allclose(a[0, :8], b[0, :8], atol=1e-6)
        assert same is prefix_same, mode
        assert not torch.allclose(a[0, 8:], b[0, 8:], atol=1e-6)  # the changed token and after always move


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_never_leaks_batched_equals_alone(preset, mode, side):
    model = tiny_model(preset)
    lengths = [5, 11, 8]
    seqs = [random_ids(1, n, seed=n)[0] for n in lengths]
    width = max(lengths)
    ids = torch.full((3, width), 1, dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    batched = model(ids, attention_mask=mask, mode=mode)
    assert torch.isfinite(batched.hidden_states).all() and torch.isfinite(batched.logits).all()
    for i, s in enumerate(seqs):
        alone = model(s[None], mode=mode)
        sl = slice(width - len(s), width) if side == "left" else slice(0, len(s))
        assert_close(batched.hidden_states[i, sl], alone.hidden_states[0], atol=2e-5, rtol=1e-4)
        assert_close(batched.logits[i, sl], alone.logits[0], atol=2e-5, rtol=1e-4)
    # the pad token's id must not matter either
    ids2 = ids.masked_fill(mask == 0, 77)
    assert_close(model(ids2, attention_mask=mask, mode=mode).hidden_states * mask[..., None],
                 batched.hidden_states * mask[..., None], atol=1e-6, rtol=0)


@pytest.mark.parametrize("preset", PRESETS)
def test_kv_cache_decode_equals_full_recompute(preset):
    model = tiny_model(preset)
    ids = random_ids(2, 20)
    full = model(ids).logits
    model.setup_caches(2, 64)
    step_logits = [model(ids[:, :7], input_pos=0).logits]  # prefill 7
    step_logits.append(model(ids[:, 7:12], input_pos=7).logits)  # a chunk of 5 on top of the cache
    for pos in range(12, 20):  # then one token at a time
        step_logits.append(model(ids[:, pos:pos + 1], input_pos=pos).logits)
    assert_close(torch.cat(step_logits, dim=1), full, atol=2e-5, rtol=1e-4)


def test_kv_cache_with_left_padding_equals_full_recompute():
    model = tiny_model()
    ids = random_ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    full = model(ids, attention_mask=mask).logits
    model.setup_caches(2, 32)
    parts = [model(ids[:, :6], attention_mask=mask[:, :6], input_pos=0).logits]
    for pos in range(6, 10):
        parts.append(model(ids[:, pos:pos + 1], attention_mask=mask[:, :pos + 1], input_pos=pos).logits)
    got = torch.cat(parts, dim=1)
    assert_close(got[:, 4:], full[:, 4:], atol=2e-5, rtol=1e-4)


def test_forward_without_input_pos_leaves_the_cache_alone():
    model = tiny_model()
    ids = random_ids(1, 6)
    model.setup_caches(1, 16)
    model(ids, input_pos=0)
    before = model.layers[0].attention.kv_cache.k.clone()
    model(random_ids(1, 9, seed=5))
    assert torch.equal(model.layers[0].attention.kv_cache.k, before)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_inputs_embeds_equals_input_ids(preset, mode):
    model = tiny_model(preset)
    ids = random_ids(2, 9)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    a = model(ids, attention_mask=mask, mode=mode)
    b = model(inputs_embeds=model.tok_embeddings(ids), attention_mask=mask, mode=mode)
    assert torch.equal(a.hidden_states, b.hidden_states) and torch.equal(a.logits, b.logits)


def test_forward_validates_its_inputs():
    model = tiny_model()
    ids = random_ids(1, 4)
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(1, 5))
    with pytest.raises(ValueError, match="unknown attention mode"):
        model(ids, mode="nope")
    with pytest.raises(ValueError, match="setup_caches"):
        model.clear_caches() or model(ids, input_pos=0)


def test_logits_at_selects_positions():
    model = tiny_model()
    ids = random_ids(2, 7)
    full = model(ids).logits
    picked = model(ids, logits_at=torch.tensor([3, 6]), return_hidden=False)
    assert picked.hidden_states is None
    assert_close(picked.logits[:, 0], full[torch.arange(2), torch.tensor([3, 6])])


def test_registered_attention_mode_is_called_per_layer_with_structural_context():
    model = tiny_model()
    calls = []

    def spy(q, k, v, ctx):
        calls.append((q.shape, k.shape, ctx.causal, ctx.q_offset))
        return sdpa_attention(q, k, v, ctx)

    register_attention_mode("spy", spy, causal=True)
    try:
        ids = random_ids(1, 10)
        out = model(ids, mode="spy").logits
        assert_close(out, model(ids, mode="causal").logits)
        assert len(calls) == model.args.n_layers
        q_shape, k_shape, causal, offset = calls[0]
        assert q_shape == (1, 4, 10, 16) and k_shape == (1, 2, 10, 16)  # GQA: K/V keep their 2 heads
        assert causal and offset == 0
    finally:
        ATTENTION_MODES.pop("spy")


def test_bfloat16_runs_close_to_float32():
    ids = random_ids(1, 16)
    ref = tiny_model()(ids).logits
    got = tiny_model(dtype=torch.bfloat16)(ids).logits
    assert got.dtype == torch.float32  # logits always come back in float32
    assert (got - ref).abs().max() < 0.1
