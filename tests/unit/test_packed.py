"""oneDNN-prepacked linears: same outputs as nn.Linear, swapped in place, only where they can run."""

import pytest
import torch
from sieve.backbone import generate
from sieve.backbone.packed import PackedLinear, can_pack, pack_linears
from torch.testing import assert_close

from .helpers import random_ids, tiny_model

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.mark.parametrize(("rows", "bias"), [((1,), False), ((3,), True), ((2, 5), False), ((4, 37), True)])
def test_packed_linear_equals_linear(rows, bias):
    lin = torch.nn.Linear(97, 131, bias=bias)  # odd sizes
    x = torch.randn(*rows, 97)
    with torch.inference_mode():
        assert_close(PackedLinear(lin)(x), lin(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-qwen2"])  # tied head; attention biases
def test_packed_model_gives_the_same_logits_and_tokens(preset):
    model = tiny_model(preset)
    ids = random_ids(2, 11)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (4, 9)]
    with torch.inference_mode():
        want = model(ids, mode="bidirectional").logits
        want_tokens = generate(model, prompts, max_new_tokens=8)
        names = pack_linears(model)
        got = model(ids, mode="bidirectional").logits
        got_tokens = generate(model, prompts, max_new_tokens=8)
    assert "output" in names and sum(isinstance(m, PackedLinear) for m in model.modules()) == len(names)
    assert len(names) == 1 + 4 * model.args.n_layers  # wqkv, wo, w13, w2 per layer and the head
    assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got_tokens == want_tokens
    assert pack_linears(model) == []  # nothing left to pack


def test_only_float32_cpu_models_are_packed():
    model = tiny_model().to(torch.bfloat16)
    assert not can_pack(model) and pack_linears(model) == []
    assert not any(isinstance(m, PackedLinear) for m in model.modules())
