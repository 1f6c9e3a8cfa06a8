"""Write tiny model files (GGUF, HF folder) the way real tools lay them out, for loader tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tokenizers
import torch
from sieve.backbone import ModelArgs
from sieve.backbone.weights import permute_qk, sieve_to_hf

from .helpers import tiny_model

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_vocab() -> tuple[list[str], list[str]]:
    """A 256-token GPT-2 byte-level vocab: 250 byte tokens, 3 merges, 3 specials."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    chars = [chr(c) for _, c in sorted(zip(bs, cs))]
    tokens = chars[:250] + ["he", "ll", "Ġw", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return tokens, ["h e", "l l", "Ġ w"]


def write_tiny_gguf(path: Path, args: ModelArgs | None = None, quant: str = "Q8_0") -> dict[str, torch.Tensor]:
    """Write a llama GGUF like llama.cpp's converter (q/k rows permuted, linear weights quantized).

    Returns the HF-layout float weights that the file decodes to (quantization already applied).
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    model = tiny_model()
    args = args or model.args
    hf = {k: v.float().numpy() for k, v in sieve_to_hf(model.state_dict(), args).items()}
    qtype = getattr(Q, quant)

    def roundtrip(w: np.ndarray) -> np.ndarray:
        return gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape) if w.ndim == 2 else w

    hf = {k: roundtrip(v) for k, v in hf.items()}  # what the file will hold after quantization
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.intermediate_size)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_dimension_count(args.head_dim)
    tokens, merges = byte_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * 253 + [3, 3, 3])
    w.add_token_merges(merges)
    w.add_bos_token_id(254)
    w.add_eos_token_id(255)
    w.add_pad_token_id(253)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)

    def put(name: str, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.ndim == 2:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(name, arr)

    put("token_embd.weight", hf["model.embed_tokens.weight"])
    put("output_norm.weight", hf["model.norm.weight"])
    for i in range(args.n_layers):
        p = f"model.layers.{i}."
        put(f"blk.{i}.attn_q.weight", permute_qk(hf[p + "self_attn.q_proj.weight"], args.n_heads))
        put(f"blk.{i}.attn_k.weight", permute_qk(hf[p + "self_attn.k_proj.weight"], args.n_kv_heads))
        put(f"blk.{i}.attn_v.weight", hf[p + "self_attn.v_proj.weight"])
        put(f"blk.{i}.attn_output.weight", hf[p + "self_attn.o_proj.weight"])
        put(f"blk.{i}.ffn_gate.weight", hf[p + "mlp.gate_proj.weight"])
        put(f"blk.{i}.ffn_up.weight", hf[p + "mlp.up_proj.weight"])
        put(f"blk.{i}.ffn_down.weight", hf[p + "mlp.down_proj.weight"])
        put(f"blk.{i}.attn_norm.weight", hf[p + "input_layernorm.weight"])
        put(f"blk.{i}.ffn_norm.weight", hf[p + "post_attention_layernorm.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return {k: torch.from_numpy(np.array(v)) for k, v in hf.items()}


def write_word_tokenizer(folder: Path) -> None:
    """A small tokenizer.json + tokenizer_config.json for HF-folder tests."""
    from tokenizers import models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(100)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE})
    )


def write_beir(folder: Path, docs: dict[str, str], queries: dict[str, str], qrels: list[tuple[str, str, int]],
               split: str = "train") -> None:
    """A BEIR-format retrieval set: corpus.jsonl, queries.jsonl and qrels/{split}.tsv."""
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "title": "", "text": v}) + "\n"
                                                 for k, v in docs.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    (folder / "qrels" / f"{split}.tsv").write_text("query-id\tcorpus-id\tscore\n" +
                                                   "".join(f"{q}\t{d}\t{g}\n" for q, d, g in qrels))


def load_tiny_backbone(tmp_path_factory, max_seq_len: int | None = None):
    """A tiny random-weight GGUF written to a temp folder and loaded (float32, CPU); `max_seq_len` sets its context
    (the weights do not depend on it)."""
    from sieve.backbone import load_backbone

    args = ModelArgs.from_name("tiny")
    if max_seq_len is not None:
        args.max_seq_len = max_seq_len
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_tiny_gguf(path, args)
    return load_backbone(path, home=tmp_path_factory.mktemp("home"), device="cpu", dtype="float32")
