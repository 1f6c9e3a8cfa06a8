"""Token-based chunking with overlap: a document's tokens cut into windows of `size` with `overlap` shared tokens.

Chunks are cut on the embedder's own tokens (so a chunk fits the model) and their text is the exact slice of the
document those tokens came from (character offsets from the tokenizer), not a re-decoding, so what search returns
is what the user indexed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

TokenSpans = Callable[[str], list[tuple[int, int]]]


@dataclass(frozen=True)
class Piece:
    ordinal: int
    text: str
    token_start: int  # [start, end) in the document's tokens
    token_end: int


def windows(n_tokens: int, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) token windows covering n_tokens: each `size` long (the last may be shorter), consecutive ones
    sharing `overlap` tokens; a tail shorter than the overlap is not cut into a window of its own."""
    if size < 1:
        raise ValueError(f"chunk size must be positive, got {size}")
    if not 0 <= overlap < size:
        raise ValueError(f"chunk overlap must be in [0, {size}), got {overlap}")
    out, start, step = [], 0, size - overlap
    while start < n_tokens:
        end = min(start + size, n_tokens)
        out.append((start, end))
        if end == n_tokens:
            break
        start += step
    return out


def chunk_text(text: str, token_spans: TokenSpans, *, size: int, overlap: int) -> list[Piece]:
    """Cut `text` into pieces of at most `size` tokens. Whitespace-only text gives no pieces."""
    spans = token_spans(text)
    pieces = []
    for start, end in windows(len(spans), size, overlap):
        piece = text[spans[start][0]:spans[end - 1][1]].strip()
        if piece:
            pieces.append(Piece(len(pieces), piece, start, end))
    return pieces
