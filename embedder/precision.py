"""Output precisions: float32, int8 (per-dimension calibrated ranges) and binary (packed sign bits), and rescoring.

int8: each dimension's [lo, hi] range (from calibration embeddings) is mapped linearly onto [-128, 127].
binary: one bit per dimension (x > 0), packed 8 per byte with numpy.packbits.
Rescoring: first-stage search over compact codes, then the float query is scored against each candidate's
dequantized code, which recovers most of float32's ranking quality at a fraction of the memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

PRECISIONS = ("float32", "int8", "binary")


@dataclass
class Int8Ranges:
    lo: np.ndarray  # [D] float32
    hi: np.ndarray  # [D] float32

    @classmethod
    def fit(cls, embeddings: np.ndarray, quantile: float = 0.001) -> Int8Ranges:
        """Per-dimension range from calibration embeddings, trimming outliers at `quantile` on each side."""
        if len(embeddings) < 2:
            raise ValueError("int8 calibration needs at least 2 embeddings")
        lo = np.quantile(embeddings, quantile, axis=0).astype(np.float32)
        hi = np.quantile(embeddings, 1 - quantile, axis=0).astype(np.float32)
        return cls(lo, np.maximum(hi, lo + 1e-6))

    def quantize(self, x: np.ndarray) -> np.ndarray:
        lo, hi = self.lo[: x.shape[-1]], self.hi[: x.shape[-1]]
        scaled = (x - lo) / (hi - lo) * 255.0 - 128.0
        return np.clip(np.rint(scaled), -128, 127).astype(np.int8)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        lo, hi = self.lo[: q.shape[-1]], self.hi[: q.shape[-1]]
        return ((q.astype(np.float32) + 128.0) / 255.0 * (hi - lo) + lo).astype(np.float32)


def to_binary(x: np.ndarray) -> np.ndarray:
    """[N, D] float -> [N, ceil(D/8)] uint8 packed sign bits."""
    return np.packbits(x > 0, axis=-1)


def from_binary(bits: np.ndarray, dim: int) -> np.ndarray:
    """Packed bits -> [N, dim] of ±1 float32."""
    return np.unpackbits(bits, axis=-1, count=dim).astype(np.float32) * 2.0 - 1.0


def hamming_search(query_bits: np.ndarray, doc_bits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by Hamming distance: -> (ids [Q, k], distances [Q, k]), nearest first."""
    k = min(k, len(doc_bits))
    dist = np.unpackbits(query_bits[:, None, :] ^ doc_bits[None, :, :], axis=-1).sum(-1)
    ids = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return ids, np.take_along_axis(dist, ids, axis=1)


def rescore(query: np.ndarray, codes: np.ndarray, precision: str, *, ranges: Int8Ranges | None = None,
            dim: int | None = None) -> np.ndarray:
    """Scores [Q, N] of float queries [Q, D] against quantized docs (int8 [N, D] or binary [N, D/8])."""
    if precision == "int8":
        if ranges is None:
            raise ValueError("int8 rescoring needs the model's calibration ranges")
        docs = ranges.dequantize(codes)
    elif precision == "binary":
        docs = from_binary(codes, dim or query.shape[-1])
    elif precision == "float32":
        docs = codes
    else:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    return query @ docs.T
