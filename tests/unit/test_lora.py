"""A trained LoRA adapter merged at load gives the same outputs as the peft-wrapped model it came from."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from sieve.backbone import load_backbone
from sieve.backbone.lora import load_lora_state, lora_state
from sieve.embedder import load_embedder
from sieve.embedder.model_dir import ADAPTER, LORA_TARGETS, EmbedderConfig
from sieve.embedder.train import _embed

from .tiny_files import write_tiny_gguf


def test_saved_adapter_merges_to_the_trained_model(tmp_path):
    from peft import LoraConfig, inject_adapter_in_model

    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    home = tmp_path / "home"
    trained = load_backbone(gguf, home=home, device="cpu", dtype="float32")
    model = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS), trained.model)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # peft starts B at zero; make the adapter do something
    adapter = lora_state(model)
    assert len(adapter) == 2 * 4 * trained.args.n_layers
    folder = tmp_path / "emb"
    folder.mkdir()
    save_file(adapter, str(folder / ADAPTER))
    EmbedderConfig(backbone=str(gguf), lora_r=4, lora_alpha=8, max_length=64, query_instruction="Q: ").save(folder)

    emb = load_embedder(folder, home=home, device="cpu", dtype="float32")
    texts = ["hello world", "a longer text about the world"]
    from sieve.embedder import LLMEncoder

    with torch.no_grad():
        want = _embed(LLMEncoder(trained, name="t", max_length=64), texts, "Q: ", 64, "mean")
    got = emb.encode_queries(texts, normalize=False)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=1e-4)
    base = load_backbone(gguf, home=home, device="cpu", dtype="float32")  # the cache itself is untouched
    ids = torch.tensor([[5, 6, 7]])
    assert not torch.allclose(base.model(ids).logits, emb.encoder.backbone.model(ids).logits)


def test_saved_adapter_loads_back_for_further_training(tmp_path):
    """`--init-adapter`: a shipped adapter goes back into a fresh peft model exactly; a different r is refused."""
    fresh = _peft_models(tmp_path)

    trained = fresh(4)
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    saved = lora_state(trained)
    again = fresh(4)
    assert not torch.equal(lora_state(again)["layers.0.attention.wqkv.lora_B"], saved["layers.0.attention.wqkv.lora_B"])
    load_lora_state(again, saved)
    assert all(torch.equal(lora_state(again)[k], v) for k, v in saved.items())
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(again(ids).logits, trained(ids).logits)
    with pytest.raises(ValueError, match="different LoRA r"):
        load_lora_state(fresh(2), saved)


def test_checkpoint_state_is_a_detached_copy_that_resumes(tmp_path):
    """`lora_checkpoint_state` (what the trainers' resumable checkpoints hold) names exactly the LoRA parameters
    `lora_parameters` returns, does not move when training goes on, and puts a fresh model back where it was."""
    from sieve.backbone.lora import lora_checkpoint_state, lora_parameters

    fresh = _peft_models(tmp_path)
    model = fresh(4)
    params = lora_parameters(model)
    assert params and all(p.ndim == 2 for p in params)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.05)
    state = lora_checkpoint_state(model)
    assert len(state) == len(params) and all("lora_" in n for n in state)
    before = {n: t.clone() for n, t in state.items()}
    with torch.no_grad():
        params[0].add_(1.0)  # training goes on after the checkpoint
    assert all(torch.equal(state[n], before[n]) for n in state)
    again = fresh(4)
    missing, unexpected = again.load_state_dict(state, strict=False)
    assert not unexpected and not any("lora_" in n for n in missing)
    assert all(torch.equal(p, before[n]) for n, p in again.named_parameters() if "lora_" in n)


def _peft_models(tmp_path):
    """A factory of fresh peft-injected tiny backbones (LoRA rank r), all from one tiny GGUF."""
    from peft import LoraConfig, inject_adapter_in_model

    gguf = tmp_path / "tiny.gguf"
    write_tiny_gguf(gguf)
    home = tmp_path / "home"

    def fresh(r):
        bb = load_backbone(gguf, home=home, device="cpu", dtype="float32")
        return inject_adapter_in_model(LoraConfig(r=r, lora_alpha=8, target_modules=LORA_TARGETS), bb.model)

    return fresh
