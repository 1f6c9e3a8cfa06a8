"""The backbone on CUDA: same results as the CPU reference. Skipped without a GPU."""

import pytest
import torch
from sieve.backbone import generate
from torch.testing import assert_close

from ..unit.helpers import random_ids, tiny_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_tiny_model_on_cuda_matches_cpu(mode):
    cpu = tiny_model()
    gpu = tiny_model().cuda()
    ids = random_ids(3, 40)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ref = cpu(ids, attention_mask=mask, mode=mode).logits
    got = gpu(ids.cuda(), attention_mask=mask.cuda(), mode=mode).logits.cpu()
    assert_close(got, ref, atol=1e-4, rtol=1e-4)
    prompts = [random_ids(1, n, seed=n)[0].tolist() for n in (3, 11)]
    assert generate(gpu, prompts, max_new_tokens=8) == generate(cpu, prompts, max_new_tokens=8)


def test_smollm2_on_cuda_matches_cpu(tmp_path):
    from sieve.backbone import load_backbone

    from sieve.registry import resolve_backbone

    path = resolve_backbone("smollm2-135m-instruct")
    cpu = load_backbone(path, home=tmp_path, device="cpu", dtype="float32")
    gpu = load_backbone(path, home=tmp_path, device="cuda", dtype="float32")
    ids = torch.tensor([cpu.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        assert_close(gpu.model(ids.cuda()).logits.cpu(), cpu.model(ids).logits, atol=2e-3, rtol=1e-3)
    prompt = cpu.encode_prompt("Name three colors.")
    assert generate(gpu.model, [prompt], max_new_tokens=24) == generate(cpu.model, [prompt], max_new_tokens=24)
