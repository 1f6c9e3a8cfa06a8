"""Model hyper-parameters: one dataclass, presets, and readers for HF `config.json` and GGUF metadata.

Everything the decoder needs to be built lives in `ModelArgs`; nothing here touches weights.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelArgs:
    vocab_size: int = 49152
    dim: int = 576  # d_model
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3  # GQA: each KV head serves n_heads // n_kv_heads query heads
    intermediate_size: int = 1536  # SwiGLU hidden size
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    # HF-style rope scaling dict ({"rope_type": "llama3" | "linear" | "default", "factor": ...}) or None
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    attention_bias: bool = False  # qwen2 has biases on q/k/v
    head_dim: int = 0  # 0: derived as dim // n_heads
    arch: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    @property
    def q_size(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.n_kv_heads * self.head_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_name(cls, name: str) -> ModelArgs:
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}")
        return cls(**PRESETS[name])

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        """Read a llama / qwen2 `config.json` (transformers 4 or 5 layout)."""
        arch = cfg.get("model_type", "llama")
        if arch not in ("llama", "qwen2", "mistral"):
            raise ValueError(f"model_type {arch!r} is not a llama-family decoder (llama, qwen2, mistral)")
        # transformers 5 keeps theta and scaling in `rope_parameters`; 4.x used `rope_theta` + `rope_scaling`
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        scaling = rope if rope.get("rope_type", "default") != "default" else cfg.get("rope_scaling")
        eos = cfg.get("eos_token_id")
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling or None,
            max_seq_len=cfg.get("max_position_embeddings", 4096),
            tie_embeddings=cfg.get("tie_word_embeddings", arch == "llama"),
            attention_bias=cfg.get("attention_bias", arch == "qwen2"),
            head_dim=cfg.get("head_dim") or 0,
            arch=arch,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
        )

    @classmethod
    def from_gguf_fields(cls, meta: dict[str, Any], *, vocab_size: int, tie_embeddings: bool) -> ModelArgs:
        """Read GGUF key/values (`{arch}.block_count`, ...) already decoded to Python values."""
        arch = meta["general.architecture"]
        if arch not in ("llama", "qwen2"):
            raise ValueError(f"GGUF architecture {arch!r} is not supported (llama, qwen2)")

        def get(key: str, default: Any = None) -> Any:
            return meta.get(f"{arch}.{key}", default)

        n_heads = get("attention.head_count")
        dim = get("embedding_length")
        scaling = None
        if get("rope.scaling.type") not in (None, "none"):
            scaling = {
                "rope_type": get("rope.scaling.type"),
                "factor": get("rope.scaling.factor", 1.0),
                "original_max_position_embeddings": get("rope.scaling.original_context_length"),
            }
        eos = meta.get("tokenizer.ggml.eos_token_id")
        return cls(
            vocab_size=vocab_size,
            dim=dim,
            n_layers=get("block_count"),
            n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv", n_heads),
            intermediate_size=get("feed_forward_length"),
            norm_eps=get("attention.layer_norm_rms_epsilon", 1e-5),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            rope_scaling=scaling,
            max_seq_len=get("context_length", 4096),
            tie_embeddings=tie_embeddings,
            attention_bias=arch == "qwen2",
            head_dim=get("attention.key_length") or dim // n_heads,
            arch=arch,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[eos] if eos is not None else [],
        )


PRESETS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(
        vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, intermediate_size=1536,
        norm_eps=1e-5, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
    ),
    # tiny random-weight configs for unit tests: no download, milliseconds per forward
    "tiny": dict(
        vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128,
        norm_eps=1e-5, rope_theta=10000.0, max_seq_len=256, tie_embeddings=True,
    ),
    "tiny-qwen2": dict(
        vocab_size=256, dim=64, n_layers=2, n_heads=6, n_kv_heads=2, intermediate_size=96,
        norm_eps=1e-6, rope_theta=1000000.0, max_seq_len=256, tie_embeddings=False,
        attention_bias=True, arch="qwen2", head_dim=16,
    ),
}
