"""Token encoders behind `Embedder`: the LLM backbone in bidirectional mode, or a sentence-transformers model.

An encoder turns (instruction, text) into token ids plus a pooling flag per token (0 for instruction and any
token that must not be pooled), and runs a padded batch to token states. Pooling, truncation to a Matryoshka
dim, normalization and output precision are the `Embedder`'s job, the same for every encoder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn
from sieve.backbone import Backbone


class InputTooLong(ValueError):
    """A text is over the model's token limit and truncation is off."""


class Encoder(Protocol):
    name: str
    dim: int  # size of the pooled (and projected) vector
    max_length: int
    pad_id: int
    default_pooling: str

    def prepare(self, text: str, instruction: str, truncate: bool) -> tuple[list[int], list[int]]: ...

    def token_spans(self, text: str) -> list[tuple[int, int]]: ...

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor: ...

    def project(self, pooled: torch.Tensor) -> torch.Tensor: ...


def _fit(instr: list[int], text: list[int], limit: int, special: int, truncate: bool) -> list[int]:
    """The text's ids, cut so instruction + text + `special` tokens fit in `limit` (or InputTooLong)."""
    total = len(instr) + len(text) + special
    if total <= limit:
        return text
    if not truncate:
        raise InputTooLong(f"a text is {total} tokens with its instruction and special tokens, over the model's "
                           f"limit of {limit}; shorten it or allow truncation")
    return text[: max(0, limit - special - len(instr))]


class LLMEncoder:
    """SmolLM2-style decoder run with bidirectional attention; `<instruction><text><eos>`."""

    default_pooling = "mean"

    def __init__(self, backbone: Backbone, *, name: str, max_length: int, projection: nn.Linear | None = None,
                 default_pooling: str = "mean"):
        self.backbone = backbone
        self.name = name
        self.max_length = min(max_length, backbone.args.max_seq_len)
        self.projection = projection
        self.dim = projection.out_features if projection is not None else backbone.args.dim
        self.pad_id = backbone.tokenizer.pad_id
        self.eos = backbone.tokenizer.eos_ids[:1]
        self.default_pooling = default_pooling
        self._instr_cache: dict[str, list[int]] = {}

    def prepare(self, text: str, instruction: str, truncate: bool) -> tuple[list[int], list[int]]:
        tok = self.backbone.tokenizer
        if instruction not in self._instr_cache:
            self._instr_cache[instruction] = tok.encode(instruction) if instruction else []
        instr = self._instr_cache[instruction]
        body = _fit(instr, tok.encode(text), self.max_length, len(self.eos), truncate)
        ids = instr + body + self.eos
        return ids, [0] * len(instr) + [1] * (len(body) + len(self.eos))

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character offsets of each of the text's tokens, as `prepare` tokenizes it."""
        return self.backbone.tokenizer.offsets(text)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.backbone.model(ids, attention_mask=mask, mode="bidirectional", return_logits=False)
        return out.hidden_states

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.projection(pooled.to(self.projection.weight.dtype)) if self.projection is not None else pooled

    @property
    def device(self) -> torch.device:
        return self.backbone.device


class SentenceTransformerEncoder:
    """A sentence-transformers folder's transformer (e.g. all-MiniLM-L6-v2): `[CLS] <instruction> <text> [SEP]`."""

    def __init__(self, folder: Path, *, device: torch.device, dtype: torch.dtype):
        import json

        from transformers import AutoModel, AutoTokenizer

        self.name = folder.name if folder.name != "model" else folder.parent.name
        cfg_file = folder / "sentence_bert_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        self.model = AutoModel.from_pretrained(str(folder), dtype=dtype).to(device).eval().requires_grad_(False)
        self.max_length = int(cfg.get("max_seq_length") or self.tokenizer.model_max_length)
        self.dim = self.model.config.hidden_size
        self.pad_id = self.tokenizer.pad_token_id or 0
        pooling_cfg = folder / "1_Pooling" / "config.json"
        pcfg = json.loads(pooling_cfg.read_text()) if pooling_cfg.is_file() else {}
        self.default_pooling = "mean" if pcfg.get("pooling_mode_mean_tokens", True) else "last"
        self._instr_cache: dict[str, list[int]] = {}

    def prepare(self, text: str, instruction: str, truncate: bool) -> tuple[list[int], list[int]]:
        if instruction not in self._instr_cache:
            self._instr_cache[instruction] = (
                self.tokenizer(instruction, add_special_tokens=False, verbose=False).input_ids if instruction else [])
        instr = self._instr_cache[instruction]
        body = _fit(instr, self.tokenizer(text, add_special_tokens=False, verbose=False).input_ids,
                    self.max_length, 2, truncate)
        ids = [self.tokenizer.cls_token_id, *instr, *body, self.tokenizer.sep_token_id]
        return ids, [1] + [0] * len(instr) + [1] * (len(body) + 1)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character offsets of each of the text's tokens, as `prepare` tokenizes it."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [tuple(span) for span in enc["offset_mapping"]]

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device
