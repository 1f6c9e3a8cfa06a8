"""The CPU matmul path for a few query rows against a long cache gives SDPA's numbers (causal with an offset,
key padding, GQA ratios, no mask), and `sdpa_attention` takes it exactly where it should."""

import pytest
import torch
import torch.nn.functional as F
from sieve.backbone.attention import LONG_KEYS, SHORT_QUERY, AttentionContext, matmul_attention, sdpa_attention
from torch.testing import assert_close


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)])
@pytest.mark.parametrize("t", [1, 3, SHORT_QUERY])
@pytest.mark.parametrize("padding", [False, True])
def test_matmul_attention_matches_sdpa(heads, kv_heads, t, padding):
    g = torch.Generator().manual_seed(t * 10 + heads)
    keys = LONG_KEYS + 37
    q = torch.randn(2, heads, t, 16, generator=g)
    k, v = (torch.randn(2, kv_heads, keys, 16, generator=g) for _ in range(2))
    pad = torch.ones(2, keys, dtype=torch.bool)
    if padding:
        pad[1, :100] = False  # the second row is left-padded
    ctx = AttentionContext(causal=True, q_len=t, q_offset=keys - t, key_padding=pad if padding else None,
                           use_cache=True)
    mask = ctx.mask if ctx.needs_mask else None
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv_heads != heads)
    assert_close(matmul_attention(q, k, v, mask), want, atol=1e-5, rtol=1e-5)
    assert_close(sdpa_attention(q, k, v, ctx), want, atol=1e-5, rtol=1e-5)  # the dispatch takes the matmul path


def test_matmul_path_only_for_short_queries_on_long_caches(monkeypatch):
    calls = []
    import sieve.backbone.attention as attention

    monkeypatch.setattr(attention, "matmul_attention", lambda *a: calls.append(a) or torch.zeros(1))
    for t, keys, used in [(1, LONG_KEYS, True), (SHORT_QUERY, 4096, True), (SHORT_QUERY + 1, 4096, False),
                          (1, LONG_KEYS - 1, False)]:
        calls.clear()
        q, k = torch.randn(1, 2, t, 8), torch.randn(1, 2, keys, 8)
        ctx = AttentionContext(causal=True, q_len=t, q_offset=keys - t, key_padding=None, use_cache=True)
        sdpa_attention(q, k, k, ctx)
        assert bool(calls) == used, (t, keys)
