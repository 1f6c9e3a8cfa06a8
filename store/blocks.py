"""REFRAG block encodings of chunks in SQL (`chunk_blocks`): written by the indexing workers, read when answering.

A record is what `sieve.refrag.encoder.EncodedPassage.to_record()` gives and `from_record` takes: encoder
fingerprint, k, n_tokens, dim and the float16 vectors as bytes.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from .models import ChunkBlocks


def put_blocks(session: Session, records: list[tuple[int, dict[str, Any]]]) -> None:
    """Store or replace the block encodings of chunks: (chunk id, record) pairs, any number of k per chunk."""
    if not records:
        return
    for k in {r["k"] for _, r in records}:
        ids = [i for i, r in records if r["k"] == k]
        for start in range(0, len(ids), 1000):
            batch = ids[start:start + 1000]
            session.execute(delete(ChunkBlocks).where(ChunkBlocks.k == k, ChunkBlocks.chunk_id.in_(batch)))
    session.execute(insert(ChunkBlocks), [
        {"chunk_id": int(i), "k": r["k"], "encoder": r["encoder"], "n_tokens": r["n_tokens"], "dim": r["dim"],
         "data": r["vectors"]} for i, r in records
    ])


def fetch_blocks(session: Session, chunk_ids: list[int], k: int) -> dict[int, dict[str, Any]]:
    """{chunk id: record} for the chunks that have block encodings for `k` (missing ones are simply absent)."""
    out: dict[int, dict[str, Any]] = {}
    for start in range(0, len(chunk_ids), 1000):
        for row in session.scalars(select(ChunkBlocks).where(
                ChunkBlocks.k == k, ChunkBlocks.chunk_id.in_([int(i) for i in chunk_ids[start:start + 1000]]))):
            out[row.chunk_id] = {"encoder": row.encoder, "k": row.k, "n_tokens": row.n_tokens, "dim": row.dim,
                                 "vectors": row.data}
    return out
