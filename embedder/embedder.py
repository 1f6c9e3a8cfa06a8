"""`Embedder.encode`: texts -> one numpy array, whatever the encoder behind it.

Steps: prepare ids (instruction + text, truncated or refused at the limit) -> length-sorted batches by a token
budget -> encoder forward (bidirectional for the LLM) -> pooling over non-instruction tokens -> projection ->
Matryoshka truncation -> L2 normalization -> output precision (float32, int8 with calibrated ranges, or packed
binary). Results come back in the caller's order.
"""

from __future__ import annotations

import numpy as np
import torch

from .batching import collate, default_batch_tokens, token_budget_batches
from .encoders import Encoder
from .pooling import POOLING_MODES, pool
from .precision import PRECISIONS, Int8Ranges, to_binary


class Embedder:
    def __init__(self, encoder: Encoder, *, query_instruction: str = "", document_instruction: str = "",
                 calibration: np.ndarray | None = None, batch_tokens: int | None = None):
        self.encoder = encoder
        self.query_instruction = query_instruction
        self.document_instruction = document_instruction
        self.calibration = calibration  # raw pooled embeddings [n, dim] for int8 ranges
        # texts x longest per forward; default by device (`batching.default_batch_tokens`)
        self.batch_tokens = batch_tokens or default_batch_tokens(encoder.device)
        self._ranges: dict[tuple[int, bool], Int8Ranges] = {}

    @property
    def name(self) -> str:
        return self.encoder.name

    @property
    def dim(self) -> int:
        return self.encoder.dim

    @property
    def max_length(self) -> int:
        return self.encoder.max_length

    def encode(
        self,
        texts: list[str],
        *,
        instruction: str | None = None,
        pooling: str | None = None,
        dim: int | None = None,
        precision: str = "float32",
        normalize: bool = True,
        truncate: bool = True,
    ) -> np.ndarray:
        """Embed `texts` -> float32 [N, dim], int8 [N, dim], or uint8 [N, ceil(dim / 8)] for binary.

        instruction: prefix seen by attention, excluded from pooling (None: none).
        dim: Matryoshka size (first `dim` dimensions, then normalized); None: the full size.
        truncate: cut texts over the token limit (keeping the instruction); False: raise InputTooLong.
        An empty string embeds the model's empty input (the LLM's end token alone); an empty list gives [0, dim].
        """
        if isinstance(texts, str):
            raise TypeError("encode takes a list of strings; wrap a single text in a list")
        pooling = pooling or self.encoder.default_pooling
        if pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLING_MODES)}")
        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
        dim = self._check_dim(dim)
        raw = self._pooled(list(texts), instruction or "", pooling, truncate)
        return self._finish(raw, dim, normalize, precision)

    def token_spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) character offsets of `text`'s tokens in this model's tokenizer (for token-based chunking)."""
        return self.encoder.token_spans(text)

    def encode_queries(self, texts: list[str], **kwargs) -> np.ndarray:
        return self.encode(texts, instruction=self.query_instruction, **kwargs)

    def encode_documents(self, texts: list[str], **kwargs) -> np.ndarray:
        return self.encode(texts, instruction=self.document_instruction, **kwargs)

    def calibrate(self, texts: list[str], **kwargs) -> None:
        """Keep raw embeddings of representative texts; int8 ranges are fitted from them per (dim, normalize)."""
        self.calibration = self._pooled(list(texts), kwargs.get("instruction") or "",
                                        kwargs.get("pooling") or self.encoder.default_pooling, True)
        self._ranges.clear()

    def int8_ranges(self, dim: int | None = None, normalize: bool = True) -> Int8Ranges:
        dim = self._check_dim(dim)
        if self.calibration is None:
            raise ValueError(f"{self.name} has no int8 calibration; call calibrate(texts) first")
        key = (dim, normalize)
        if key not in self._ranges:
            self._ranges[key] = Int8Ranges.fit(_shape(self.calibration, dim, normalize))
        return self._ranges[key]

    # ------------------------------------------------------------------------------------------------ internals

    def _check_dim(self, dim: int | None) -> int:
        if dim is None:
            return self.dim
        if not 1 <= dim <= self.dim:
            raise ValueError(f"dim must be between 1 and {self.dim}, got {dim}")
        return dim

    def _finish(self, raw: np.ndarray, dim: int, normalize: bool, precision: str) -> np.ndarray:
        out = _shape(raw, dim, normalize)
        if precision == "int8":
            return self.int8_ranges(dim, normalize).quantize(out)
        if precision == "binary":
            return to_binary(out)
        return out

    @torch.inference_mode()
    def _pooled(self, texts: list[str], instruction: str, pooling: str, truncate: bool) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        items = [self.encoder.prepare(t, instruction, truncate) for t in texts]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        device = self.encoder.device
        for batch in token_budget_batches([len(ids) for ids, _ in items], self.batch_tokens):
            ids, mask, pool_mask = collate([items[i] for i in batch], self.encoder.pad_id)
            hidden = self.encoder.forward(ids.to(device), mask.to(device))
            pooled = self.encoder.project(pool(hidden.float(), pool_mask.to(device), pooling))
            out[batch] = pooled.float().cpu().numpy()
        return out


def _shape(raw: np.ndarray, dim: int, normalize: bool) -> np.ndarray:
    out = np.ascontiguousarray(raw[:, :dim], dtype=np.float32)
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out
