"""Activation-aware channel equalization before int8 (backbone/equalize.py)."""

from __future__ import annotations

import pytest
import torch
from sieve.backbone import equalize as eq
from sieve.backbone.quant import quant_summary, quantize
from sieve.backbone.runtime import apply_speed_options

from .helpers import random_ids, tiny_model


def with_outlier_channels(preset: str = "tiny") -> torch.nn.Module:
    """A tiny model whose norms make a few input channels large, as real LLM activations have."""
    model = tiny_model(preset)
    with torch.no_grad():
        for layer in model.layers:
            layer.attention_norm.weight[[3, 17]] *= 25
            layer.ffn_norm.weight[[5, 40]] *= 25
    return model


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])
def test_equalize_keeps_the_function_and_moves_the_weights(preset):
    model, ref = with_outlier_channels(preset), with_outlier_channels(preset)
    rms = eq.input_rms(model, random_ids(3, 40).tolist())
    assert set(rms) == {f"layers.{i}.{n}" for i in range(model.args.n_layers) for n in ("wqkv", "wo", "w13", "w2")}
    eq.equalize(model, rms)
    assert not torch.equal(model.layers[0].attention_norm.weight, ref.layers[0].attention_norm.weight)
    assert not torch.equal(model.layers[1].feed_forward.w2.weight, ref.layers[1].feed_forward.w2.weight)
    assert not torch.equal(model.layers[0].attention.wo.weight, ref.layers[0].attention.wo.weight)
    ids = random_ids(2, 33, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


def test_equalized_int8_is_closer_to_float_than_plain_int8():
    ref = with_outlier_channels()
    calib = random_ids(4, 64, seed=2).tolist()
    plain, equalized = with_outlier_channels(), with_outlier_channels()
    eq.equalize(equalized, eq.input_rms(equalized, calib))
    quantize(plain, "int8", include_output=False)
    quantize(equalized, "int8", include_output=False)
    ids = random_ids(2, 48, seed=3)
    with torch.no_grad():
        want = ref(ids).logits

        def err(m):
            return ((m(ids).logits - want).norm() / want.norm()).item()

        assert err(equalized) < 0.8 * err(plain)


def test_calibrated_rms_samples_once_then_reads_the_cache(tmp_path, monkeypatch):
    model = tiny_model()
    monkeypatch.setattr(eq, "CALIBRATION_SEQUENCES", 2)
    calls = []
    real = eq.calibration_text

    def counted(m, **kw):
        calls.append(1)
        out = real(m, sequences=2, tokens=12)
        assert len(out) == 2 and all(len(s) == 12 for s in out)
        return out

    monkeypatch.setattr(eq, "calibration_text", counted)
    first = eq.calibrated_rms(model, tmp_path)
    second = eq.calibrated_rms(model, tmp_path)
    assert len(calls) == 1 and len(list(tmp_path.glob("int8-rms-*.safetensors"))) == 1
    for k in first:
        torch.testing.assert_close(first[k], second[k])
    with torch.no_grad():
        model.layers[0].attention.wo.weight[0, 0] += 1  # other weights: calibrated again
    eq.calibrated_rms(model, tmp_path)
    assert len(calls) == 2


def test_calibration_text_is_deterministic():
    model = tiny_model()
    a = eq.calibration_text(model, sequences=2, tokens=10, seed=7)
    assert a == eq.calibration_text(model, sequences=2, tokens=10, seed=7)
    assert a != eq.calibration_text(model, sequences=2, tokens=10, seed=8)


def test_speed_options_equalize_int8_only(tmp_path):
    base = tiny_model()
    int8 = apply_speed_options(tiny_model(), quant="int8", calibration_dir=tmp_path)
    assert not torch.equal(int8.layers[0].ffn_norm.weight, base.layers[0].ffn_norm.weight)
    assert list(tmp_path.glob("int8-rms-*.safetensors"))
    assert quant_summary(int8)["int8_channels"] == f"equalized, rms^{eq.ALPHA}"
    plain = apply_speed_options(tiny_model(), quant="int8", equalize_int8=False)
    int4 = apply_speed_options(tiny_model(), quant="int4", calibration_dir=tmp_path / "x")
    for m in (plain, int4):
        assert torch.equal(m.layers[0].ffn_norm.weight, base.layers[0].ffn_norm.weight)
        assert "int8_channels" not in quant_summary(m)
    assert not (tmp_path / "x").exists()
