"""Read weights into this decoder's state dict: from a GGUF file or from a HF llama/qwen2 safetensors folder.

Both readers return `(ModelArgs, state_dict)` with float32 tensors keyed like `model.Transformer`.
GGUF tensors are dequantized with the `gguf` package's own reference code; llama GGUFs store q/k rows in
the interleaved RoPE order that llama.cpp's converter produced, so they are permuted back to HF's layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch

from .config import ModelArgs

StateDict = dict[str, torch.Tensor]


class WeightsError(ValueError):
    """The weights at a path cannot be read; the message names the path and what is wrong."""


# ---------------------------------------------------------------------------------------------------- GGUF


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved pairs -> two halves per head)."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (HF halves -> interleaved pairs); the inverse of `unpermute_qk`."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: Path) -> tuple[ModelArgs, StateDict]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # the reader raises ValueError/struct errors on non-GGUF bytes
        raise WeightsError(f"{path}: not a readable GGUF file ({e})") from e
    skip = ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges")
    meta = {k: f.contents() for k, f in reader.fields.items() if k not in skip and not k.startswith("GGUF.")}
    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise WeightsError(f"{path}: GGUF has no token_embd.weight; not a llama-family model")
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data) if "tokenizer.ggml.tokens" in reader.fields else None
    emb_rows = int(tensors["token_embd.weight"].shape[-1])
    args = ModelArgs.from_gguf_fields(
        meta, vocab_size=n_vocab or emb_rows, tie_embeddings="output.weight" not in tensors
    )

    def get(name: str) -> np.ndarray:
        t = tensors[name]
        return np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
            [int(d) for d in reversed(t.shape)]
        )

    permute = args.arch == "llama"
    sd: dict[str, np.ndarray] = {
        "tok_embeddings.weight": get("token_embd.weight"),
        "norm.weight": get("output_norm.weight"),
    }
    if not args.tie_embeddings:
        sd["output.weight"] = get("output.weight")
    for i in range(args.n_layers):
        p, o = f"blk.{i}.", f"layers.{i}."
        q, k = get(p + "attn_q.weight"), get(p + "attn_k.weight")
        if permute:
            q, k = unpermute_qk(q, args.n_heads), unpermute_qk(k, args.n_kv_heads)
        sd[o + "attention.wqkv.weight"] = np.concatenate([q, k, get(p + "attn_v.weight")])
        if args.attention_bias:
            sd[o + "attention.wqkv.bias"] = np.concatenate([get(p + f"attn_{x}.bias") for x in "qkv"])
        sd[o + "attention.wo.weight"] = get(p + "attn_output.weight")
        sd[o + "feed_forward.w13.weight"] = np.concatenate([get(p + "ffn_gate.weight"), get(p + "ffn_up.weight")])
        sd[o + "feed_forward.w2.weight"] = get(p + "ffn_down.weight")
        sd[o + "attention_norm.weight"] = get(p + "attn_norm.weight")
        sd[o + "ffn_norm.weight"] = get(p + "ffn_norm.weight")
    return args, {k: torch.from_numpy(v if v.flags.writeable else v.copy()) for k, v in sd.items()}


def gguf_metadata(path: Path) -> dict:
    """Tokenizer-relevant key/values of a GGUF (special ids, chat template, flags)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    keys = [k for k in reader.fields if k.startswith("tokenizer.") and not k.startswith(
        ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"))]
    return {k: reader.fields[k].contents() for k in keys}


# ------------------------------------------------------------------------------------- HF safetensors folder

_HF_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_HF_RENAME = {
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def read_hf_folder(path: Path) -> tuple[ModelArgs, StateDict]:
    from safetensors.torch import load_file

    cfg_path = path / "config.json"
    files = sorted(path.glob("*.safetensors"))
    if not cfg_path.is_file() or not files:
        raise WeightsError(f"{path}: expected config.json and *.safetensors in the folder")
    args = ModelArgs.from_hf_config(json.loads(cfg_path.read_text()))
    raw: StateDict = {}
    for f in files:
        raw.update(load_file(str(f)))
    return args, hf_to_sieve(raw, args)


def hf_to_sieve(raw: StateDict, args: ModelArgs) -> StateDict:
    """Rename/fuse HF llama keys (q/k/v -> wqkv, gate/up -> w13)."""
    sd: StateDict = {"tok_embeddings.weight": raw["model.embed_tokens.weight"], "norm.weight": raw["model.norm.weight"]}
    if not args.tie_embeddings:
        sd["output.weight"] = raw.get("lm_head.weight", raw["model.embed_tokens.weight"])
    for i in range(args.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        sd[o + "attention.wqkv.weight"] = torch.cat([raw[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        if args.attention_bias:
            sd[o + "attention.wqkv.bias"] = torch.cat([raw[p + f"self_attn.{x}_proj.bias"] for x in "qkv"])
        sd[o + "feed_forward.w13.weight"] = torch.cat([raw[p + "mlp.gate_proj.weight"], raw[p + "mlp.up_proj.weight"]])
        for hf, ours in _HF_RENAME.items():
            sd[o + ours] = raw[p + hf]
    return sd


def sieve_to_hf(sd: StateDict, args: ModelArgs) -> StateDict:
    """The inverse of `hf_to_sieve` (for writing test fixtures and exporting)."""
    out: StateDict = {"model.embed_tokens.weight": sd["tok_embeddings.weight"], "model.norm.weight": sd["norm.weight"]}
    if not args.tie_embeddings:
        out["lm_head.weight"] = sd["output.weight"]
    for i in range(args.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        for x, t in zip("qkv", sd[o + "attention.wqkv.weight"].split([args.q_size, args.kv_size, args.kv_size])):
            out[p + f"self_attn.{x}_proj.weight"] = t
        if args.attention_bias:
            for x, t in zip("qkv", sd[o + "attention.wqkv.bias"].split([args.q_size, args.kv_size, args.kv_size])):
                out[p + f"self_attn.{x}_proj.bias"] = t
        gate, up = sd[o + "feed_forward.w13.weight"].split(args.intermediate_size)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = gate, up
        for hf, ours in _HF_RENAME.items():
            out[p + hf] = sd[o + ours]
    return {k: v.contiguous() for k, v in out.items()}
