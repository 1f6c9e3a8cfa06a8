"""Triton kernels on CUDA at full size against their torch references. Skipped without a GPU."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from ..unit.helpers import random_ids, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def qkv(t, h=9, hkv=3, d=64, dtype=torch.bfloat16, b=1):
    g = torch.Generator(device="cuda").manual_seed(t)
    return [torch.randn(b, n, t, d, device="cuda", dtype=dtype, generator=g) for n in (h, hkv, hkv)]


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t", [4096, 8191])
def test_full_mask_equals_sdpa(causal, t):
    from sieve.kernels import block_sparse_attention

    q, k, v = qkv(t)
    n = -(-t // 64)
    mask = torch.ones(1, 9, n, n, dtype=torch.bool, device="cuda")
    got = block_sparse_attention(q, k, v, mask, causal=causal)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


def test_estimated_mask_kernel_matches_reference_at_8k():
    from sieve.kernels import block_sparse_attention, block_sparse_attention_reference, estimate_block_mask

    q, k, v = qkv(8192)
    mask, _ = estimate_block_mask(q, k, causal=True)
    got = block_sparse_attention(q, k, v, mask, causal=True)
    want = block_sparse_attention_reference(q, k, v, mask, causal=True)
    assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("m", [1, 4, 16, 64, 512])
@pytest.mark.parametrize("n,k", [(960, 576), (3072, 576), (576, 1536), (49152, 576), (4096, 4096), (4096, 14336)])
def test_quant_matmul_matches_reference(m, n, k):
    from sieve.kernels.quant_matmul import (
        int4_matmul,
        int4_matmul_reference,
        int8_matmul,
        int8_matmul_reference,
        quantize_int4,
        quantize_int8,
    )

    w = torch.randn(n, k, device="cuda") * 0.02
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w8, s8 = quantize_int8(w)
    y8, r8 = int8_matmul(x, w8, s8).float(), int8_matmul_reference(x, w8, s8).float()
    assert ((y8 - r8).norm() / r8.norm()) < 1e-2
    w4, s4, z4 = quantize_int4(w, 128 if k % 128 == 0 else 64)
    y4, r4 = int4_matmul(x, w4, s4, z4).float(), int4_matmul_reference(x, w4, s4, z4).float()
    assert ((y4 - r4).norm() / r4.norm()) < 1e-2


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_tiny_model_on_cuda_matches_cpu(scheme):
    from sieve.backbone.quant import quantize

    cpu, gpu = tiny_model(), tiny_model()
    quantize(cpu, scheme)
    quantize(gpu.cuda(), scheme)
    ids = random_ids(2, 40)
    with torch.no_grad():
        want, got = cpu(ids).logits, gpu(ids.cuda()).logits.cpu()
    assert ((got - want).norm() / want.norm()) < 3e-2  # CPU runs bf16 activations, CUDA fp32 through Triton


def test_sparse_mode_on_cuda_with_gamma_one_equals_causal():
    from sieve.backbone import ATTENTION_MODES
    from sieve.kernels import SparseConfig, register_sparse_attention

    register_sparse_attention(SparseConfig(block_size=16, gamma=1.0, min_length=0, last_q=16))
    try:
        model = tiny_model().cuda()
        ids = random_ids(2, 200).cuda()
        with torch.no_grad():
            assert_close(model(ids, mode="sparse").logits, model(ids).logits, atol=1e-3, rtol=1e-3)
    finally:
        ATTENTION_MODES.pop("sparse", None)
        ATTENTION_MODES.pop("sparse-bidirectional", None)


def test_compiled_estimator_gives_the_eager_mask_at_8k():
    from sieve.kernels import SparseConfig, estimate_block_mask

    q, k, _ = qkv(8192)
    eager, vs_eager = estimate_block_mask(q, k, causal=True, config=SparseConfig(compile=False))
    compiled, vs_compiled = estimate_block_mask(q, k, causal=True, config=SparseConfig(compile=True))
    assert torch.equal(vs_eager, vs_compiled)
    assert (eager != compiled).float().mean() < 1e-3  # float reductions may reorder: at most a few blocks differ


@pytest.mark.parametrize("m", [1, 2, 4])
def test_int4_gemv_rows_match_reference(m):
    from sieve.kernels.quant_matmul import int4_matmul, int4_matmul_reference, quantize_int4

    w = torch.randn(3072, 576, device="cuda") * 0.02
    w4, s4, z4 = quantize_int4(w, 64)
    x = torch.randn(m, 576, device="cuda", dtype=torch.float32)
    assert_close(int4_matmul(x, w4, s4, z4), int4_matmul_reference(x, w4, s4, z4), atol=1e-3, rtol=1e-3)
