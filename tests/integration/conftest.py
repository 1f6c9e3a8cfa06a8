import pytest
import torch
from sieve.backbone import load_backbone

from sieve.registry import resolve_backbone


@pytest.fixture(scope="session")
def smollm2_path():
    return resolve_backbone("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def sieve_home(tmp_path_factory):
    return tmp_path_factory.mktemp("sieve-home")


@pytest.fixture(scope="session")
def smollm2(smollm2_path, sieve_home):
    """The real backbone, converted from the packaged GGUF once per test session."""
    return load_backbone(smollm2_path, home=sieve_home, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """HF transformers' own model, loaded from the same GGUF: the parity reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name,
                                                 dtype=torch.float32)
    model.generation_config.eos_token_id = None  # compare a fixed number of tokens
    model.generation_config.pad_token_id = 2
    return model.eval()
