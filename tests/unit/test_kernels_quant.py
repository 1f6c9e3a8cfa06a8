"""Weight-only int8 / int4: formats, the CPU modules (torch packed kernels, bf16 prefill copy), quantize()."""

import pytest
import torch
import torch.nn as nn
from sieve.backbone import generate
from sieve.backbone.quant import (
    Int4Linear,
    WeightOnlyInt8Linear,
    int4_group_size,
    quant_summary,
    quantize,
)
from sieve.kernels.quant_matmul import (
    dequantize_int4,
    dequantize_int8,
    int4_matmul_reference,
    int8_matmul_reference,
    pack_int4,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)

from .helpers import random_ids, tiny_model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_int8_round_trip_is_within_half_a_step():
    w = torch.randn(37, 101)
    w_q, scales = quantize_int8(w)
    assert w_q.dtype == torch.int8 and scales.shape == (37,)
    assert ((dequantize_int8(w_q, scales) - w).abs() <= scales[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("k,group", [(256, 128), (100, 32), (576, 64)])
def test_int4_round_trip_and_packing(k, group):
    w = torch.randn(19, k)
    w_q, scales, zeros = quantize_int4(w, group)
    kp = -(-k // group) * group
    assert w_q.shape == (19, kp // 2) and w_q.dtype == torch.uint8 and scales.shape == (19, kp // group)
    assert torch.equal(pack_int4(unpack_int4(w_q)), w_q)
    step = scales.repeat_interleave(group, 1)[:, :k]
    assert ((dequantize_int4(w_q, scales, zeros, k) - w).abs() <= step / 2 + 1e-5).all()


@pytest.mark.parametrize("cls", [WeightOnlyInt8Linear, Int4Linear])
@pytest.mark.parametrize("n,k", [(33, 100), (70, 257), (48, 576)])
@pytest.mark.parametrize("rows", [1, 5, 40])  # packed kernel (decode) and the bf16 copy (prefill)
def test_quantized_linear_matches_reference(cls, n, k, rows):
    torch.manual_seed(n + k)
    lin = nn.Linear(k, n, bias=True)
    if cls is WeightOnlyInt8Linear:
        mod = cls.from_linear(lin)
    else:
        mod = cls.from_linear(lin, group_size=int4_group_size(k, 128))
    x = torch.randn(2, rows, k)
    if cls is WeightOnlyInt8Linear:
        ref = int8_matmul_reference(x, mod.weight, mod.scales) + lin.bias
    else:
        ref = int4_matmul_reference(x, mod.weight, mod.scales, mod.zeros) + lin.bias
    with torch.no_grad():
        got = mod(x)
    assert got.shape == (2, rows, n) and got.dtype == torch.float32
    assert rel_err(got, ref) < 1e-2  # bf16 activations on the CPU paths
    assert mod.cpu_path(2 * rows) == ("dense" if 2 * rows >= 32 else "packed")
    int_bits = 8 if cls is WeightOnlyInt8Linear else 4
    assert rel_err(got, lin(x)) < (0.02 if int_bits == 8 else 0.2)  # quantization error itself


def test_int4_group_size_falls_back_for_d_model_576():
    assert int4_group_size(1536, 128) == 128 and int4_group_size(576, 128) == 64 and int4_group_size(100, 128) == 128
    assert int4_group_size(576) == 32  # the default: Q4_1's block size


def test_int4_group_32_requantizes_q4_1_weights_exactly():
    """Weights that are already 4-bit per block of 32 (as dequantized from a Q4_1 GGUF) come back unchanged."""
    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (24, 96), generator=g).float()
    q[:, ::32], q[:, 1::32] = 0, 15  # Q4_1 blocks span their full range
    d = torch.rand(24, 3, 1, generator=g) * 0.01 + 1e-3
    m = torch.randn(24, 3, 1, generator=g) * 0.01
    w = (q.view(24, 3, 32) * d + m).view(24, 96)
    lin = nn.Linear(96, 24, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    mod = Int4Linear.from_linear(lin, group_size=32)
    torch.testing.assert_close(mod.dequantized(), w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("scheme,tol", [("int8", 0.03), ("int4", 0.35)])
def test_quantized_tiny_model_matches_its_dequantized_twin_and_stays_near_fp32(scheme, tol):
    ref_model = tiny_model()
    model = tiny_model()
    swapped = quantize(model, scheme)
    n_layers = model.args.n_layers
    assert len(swapped) == 4 * n_layers + 1 and "output" in swapped
    assert model.output.weight.dtype == torch.int8  # the head is int8 by default, also under int4
    assert model.tok_embeddings.weight.dtype == torch.float32  # the embedding keeps its float table
    twin = tiny_model(tie_embeddings=False)  # same weights, each linear replaced by its dequantized float weight
    with torch.no_grad():
        for name, mod in model.named_modules():
            if hasattr(mod, "dequantized") and name != "decode_output":
                twin.get_submodule(name).weight.copy_(mod.dequantized())
    ids = random_ids(2, 48)
    with torch.no_grad():
        for rows in (ids[:, :8], ids):  # decode-sized (packed kernels) and prefill-sized (bf16 copy)
            got = model(rows).logits
            assert rel_err(got, twin(rows).logits) < 0.03  # only bf16 activations differ
            want = ref_model(rows).logits
            assert rel_err(got, want) < tol  # random gaussian weights: int4 with 16 levels is coarse
            agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
            assert agree > (0.9 if scheme == "int8" else 0.5)
    out = generate(model, [ids[0, :10].tolist()], max_new_tokens=6)
    assert len(out[0]) == 6
    # int4 also gets a decode-only int4 head (half the bytes of the int8 one); forward keeps the int8 head
    assert (model.decode_output is not None) == (scheme == "int4")
    if scheme == "int4":
        assert model.decode_output.weight.dtype == torch.uint8
        assert quant_summary(model)["decode_lm_head"] == "int4"
    summary = quant_summary(model)
    assert summary["scheme"] == scheme and summary["linears"] == len(swapped) and summary["lm_head"] == "int8"
    int4_head = tiny_model()
    quantize(int4_head, "int4", output_scheme=None)
    assert int4_head.output.weight.dtype == torch.uint8


def test_quantize_can_leave_the_tied_head_alone_and_rejects_unknown_schemes():
    model = tiny_model()
    swapped = quantize(model, "int8", include_output=False)
    assert "output" not in swapped and model.output.weight is model.tok_embeddings.weight
    with pytest.raises(ValueError, match="unknown quantization scheme"):
        quantize(tiny_model(), "int3")
    assert quant_summary(tiny_model()) == {"scheme": "none"}


def test_speed_options_apply_once_and_refuse_a_second_scheme():
    from sieve.backbone.runtime import apply_speed_options, decode_path

    model = tiny_model()
    assert decode_path(model) == "eager static decode step, weights float"
    apply_speed_options(model, quant="none", pack=False)
    assert getattr(model, "quant_scheme", None) is None
    apply_speed_options(model, quant="int4")
    packed = model.layers[0].attention.wqkv
    apply_speed_options(model, quant="int4")  # again: nothing changes
    assert model.layers[0].attention.wqkv is packed and decode_path(model).endswith("weights int4")
    with pytest.raises(ValueError, match="already quantized to int4"):
        apply_speed_options(model, quant="int8")
    with pytest.raises(ValueError, match="choose int8 or int4"):
        apply_speed_options(tiny_model(), quant="int2")


def test_speed_options_pack_float_linears_unless_quantized_or_compiled():
    from sieve.backbone.packed import PackedLinear, can_pack
    from sieve.backbone.runtime import apply_speed_options, decode_path

    if not can_pack(tiny_model()):
        pytest.skip("torch built without oneDNN")
    model = apply_speed_options(tiny_model())
    assert isinstance(model.layers[0].feed_forward.w13, PackedLinear)
    assert decode_path(model) == "eager static decode step, weights float, oneDNN-packed"
    with pytest.raises(ValueError, match="already packed"):
        apply_speed_options(model, quant="int4")
    quantized = apply_speed_options(tiny_model(), quant="int8")
    assert not any(isinstance(m, PackedLinear) for m in quantized.modules())
