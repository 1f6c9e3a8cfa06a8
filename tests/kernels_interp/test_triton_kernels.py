"""Triton kernels against their torch references on small shapes.

Runs on CPU only through Triton's interpreter, which must be switched on before `triton` is imported:
tests/unit/test_kernels_triton.py runs this folder in its own process with TRITON_INTERPRET=1. Without the
interpreter and without CUDA the module skips. On a CUDA machine it runs the compiled kernels.
Under the interpreter bf16 arithmetic is not faithful, so inputs are float32 there.
"""

import os

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not INTERPRET and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (set before triton is imported) or CUDA")
DEVICE = "cpu" if INTERPRET else "cuda"

from sieve.kernels import (  # noqa: E402
    block_sparse_attention,
    block_sparse_attention_reference,
    estimate_block_mask,
    int4_matmul,
    int4_matmul_reference,
    int8_matmul,
    int8_matmul_reference,
    quantize_int4,
    quantize_int8,
)
from sieve.kernels.sparse_pattern import SparseConfig  # noqa: E402

BS = 16  # small blocks keep the interpreter fast; the kernel is the same for 64


def qkv(b, h, hkv, tq, tk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g)
    k = torch.randn(b, hkv, tk, d, generator=g)
    v = torch.randn(b, hkv, tk, d, generator=g)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


def n_blocks(t):
    return -(-t // BS)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("h,hkv", [(4, 4), (6, 2), (8, 1)])  # GQA ratios 1, 3, 8
@pytest.mark.parametrize("t", [1, 37, 64])
def test_full_mask_equals_dense_attention(causal, h, hkv, t):
    q, k, v = qkv(2, h, hkv, t, t, 32)
    mask = torch.ones(2, h, n_blocks(t), n_blocks(t), dtype=torch.bool, device=DEVICE)
    got = block_sparse_attention(q, k, v, mask, causal=causal, block_size=BS)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert_close(got, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_offset", [0, 5, 16])
def test_random_block_mask_with_padding_matches_reference(causal, q_offset):
    t = 50
    q, k, v = qkv(2, 6, 2, t, t + q_offset, 24, seed=q_offset)
    g = torch.Generator().manual_seed(1)
    mask = (torch.rand(2, 6, n_blocks(t), n_blocks(t + q_offset), generator=g) > 0.5).to(DEVICE)
    padding = (torch.rand(2, t + q_offset, generator=g) > 0.3).to(DEVICE)
    for kp in (None, padding):
        got = block_sparse_attention(q, k, v, mask, causal=causal, q_offset=q_offset, key_padding=kp, block_size=BS)
        want = block_sparse_attention_reference(q, k, v, mask, causal=causal, q_offset=q_offset, key_padding=kp,
                                                block_size=BS)
        assert_close(got, want, atol=2e-5, rtol=2e-5)


def test_empty_rows_give_zeros_not_nan():
    q, k, v = qkv(1, 3, 3, 40, 40, 16)
    mask = torch.zeros(1, 3, 3, 3, dtype=torch.bool, device=DEVICE)
    mask[0, 0] = True  # head 0 dense, head 1 nothing, head 2 only a block above the diagonal (causally empty)
    mask[0, 2, 0, 2] = True
    got = block_sparse_attention(q, k, v, mask, causal=True, block_size=BS)
    assert torch.isfinite(got).all()
    assert (got[0, 1] == 0).all() and (got[0, 2, :BS] == 0).all()
    assert_close(got[0, 0], F.scaled_dot_product_attention(q, k, v, is_causal=True)[0, 0], atol=2e-5, rtol=2e-5)


def test_estimated_mask_through_the_kernel_matches_reference():
    q, k, v = qkv(1, 6, 2, 97, 97, 32, seed=3)
    mask, _ = estimate_block_mask(q, k, causal=True, config=SparseConfig(block_size=BS, gamma=0.6, last_q=16))
    assert not mask.all()
    got = block_sparse_attention(q, k, v, mask, causal=True, block_size=BS)
    assert_close(got, block_sparse_attention_reference(q, k, v, mask, causal=True, block_size=BS),
                 atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("m", [1, 3, 16, 33])  # GEMV (split-K) and GEMM
@pytest.mark.parametrize("n,k", [(33, 100), (70, 257), (48, 384)])
def test_int8_matmul_matches_reference(m, n, k):
    g = torch.Generator().manual_seed(m * n)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    w_q, scales = (t.to(DEVICE) for t in quantize_int8(w))
    x = x.to(DEVICE)
    assert_close(int8_matmul(x, w_q, scales), int8_matmul_reference(x, w_q, scales), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("n,k,group", [(33, 100, 32), (70, 257, 128), (48, 384, 128), (16, 576, 64)])
def test_int4_matmul_matches_reference(m, n, k, group):
    g = torch.Generator().manual_seed(m + n)
    w, x = torch.randn(n, k, generator=g), torch.randn(2, m, k, generator=g)  # leading dims are kept
    w_q, scales, zeros = (t.to(DEVICE) for t in quantize_int4(w, group))
    x = x.to(DEVICE)
    got = int4_matmul(x, w_q, scales, zeros)
    assert got.shape == (2, m, n)
    assert_close(got, int4_matmul_reference(x, w_q, scales, zeros), atol=1e-4, rtol=1e-4)
