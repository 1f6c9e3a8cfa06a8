"""REFRAG on CUDA (the shipped refrag-k16 on the real SmolLM2 and all-MiniLM-L6-v2): the same prompt inputs, logits
and greedy answers as on the CPU, compressed, a quarter expanded and fully expanded. Skipped without a GPU."""

import pytest
import torch
from sieve.refrag import Answerer, load_refrag
from torch.testing import assert_close

from ..integration.test_refrag_real import PASSAGES  # two NQ-open passages

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

QUESTION = "when is the next deadpool movie being released"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    cpu = load_refrag("refrag-k16", home=home, device="cpu", dtype="float32")
    gpu = load_refrag("refrag-k16", home=home, device="cuda", dtype="float32")
    return cpu, gpu


@pytest.mark.parametrize("expansion", [0.0, 0.25, 1.0])
def test_refrag_on_cuda_matches_cpu(pair, expansion):
    cpu, gpu = pair
    assert gpu.device.type == "cuda" and next(gpu.projector.parameters()).device.type == "cuda"
    layouts = [r.qa_layout(QUESTION, r.encode(PASSAGES)) for r in pair]
    # the chunk encoder on the GPU gives the CPU's block vectors, so the policy expands the same blocks
    for a, b in zip(layouts[0].blocks, layouts[1].blocks):
        assert a.token_ids == b.token_ids
        assert_close(b.vector.float().cpu(), a.vector.float(), atol=1e-4, rtol=1e-4)
    query = [r.blocks.encode_query(QUESTION) for r in pair]
    expand = [r.choose_expansion(lay, expansion, query=q) for r, lay, q in zip(pair, layouts, query)]
    assert expand[0] == expand[1]
    with torch.no_grad():
        x = [r.embed(lay, e) for r, lay, e in zip(pair, layouts, expand)]
        assert x[1].device.type == "cuda"
        assert_close(x[1].cpu(), x[0], atol=1e-4, rtol=1e-4)
        logits = [r.model(inputs_embeds=e).logits[0, -1] for r, e in zip(pair, x)]
    assert_close(logits[1].cpu(), logits[0], atol=2e-3, rtol=1e-3)
    answers = [Answerer(r).stream(QUESTION, PASSAGES, expansion=expansion, max_new_tokens=16) for r in pair]
    texts = ["".join(a) for a in answers]
    assert answers[1].token_ids == answers[0].token_ids and texts[1] == texts[0]
    assert answers[1].stats.prompt_positions == answers[0].stats.prompt_positions
