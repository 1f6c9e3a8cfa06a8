"""Chunk vectors in SQL: the durable copy a FAISS index is rebuilt and reconciled from (why SQL: see index.py).

A vector is stored as float32 little-endian bytes in `chunk_vectors`, written in the caller's transaction, ideally
the one that writes its chunk rows. `collection_vector_ids` + `fetch_vectors` are what `CollectionIndex.load`
needs to reconcile a snapshot with the database:

    with session_scope(engine) as s:
        index.load(collection_vector_ids(s, collection.id), lambda ids: fetch_vectors(s, ids))
"""

from __future__ import annotations

import numpy as np
from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from .models import Chunk, ChunkVector, Document

_IN_BATCH = 1000  # ids per IN (...) list: well under every backend's bound-parameter limit


def pack(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype="<f4").tobytes()


def unpack(data: bytes, dim: int) -> np.ndarray:
    vector = np.frombuffer(data, dtype="<f4")
    if vector.size != dim:
        raise ValueError(f"stored vector has {vector.size} floats, expected {dim}")
    return vector


def _batches(ids: np.ndarray):
    for start in range(0, len(ids), _IN_BATCH):
        yield [int(i) for i in ids[start:start + _IN_BATCH]]


def put_vectors(session: Session, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Store or replace the vectors of existing chunks `ids` (row i of `vectors` belongs to ids[i])."""
    ids = np.asarray(ids, dtype="int64").reshape(-1)
    vectors = np.asarray(vectors, dtype="float32")
    if vectors.ndim != 2 or len(vectors) != len(ids):
        raise ValueError(f"need one row per id: {len(ids)} ids, vectors of shape {vectors.shape}")
    for batch in _batches(ids):
        session.execute(delete(ChunkVector).where(ChunkVector.chunk_id.in_(batch)))
    if len(ids):
        dim = vectors.shape[1]
        session.execute(insert(ChunkVector), [
            {"chunk_id": int(i), "dim": dim, "data": pack(v)} for i, v in zip(ids, vectors)
        ])


def collection_vector_ids(session: Session, collection_id: int) -> np.ndarray:
    """Sorted ids of the chunks of `collection_id` that have a stored vector: what its index should hold."""
    rows = session.scalars(
        select(ChunkVector.chunk_id)
        .join(Chunk, Chunk.id == ChunkVector.chunk_id)
        .join(Document, Document.id == Chunk.document_id)
        .where(Document.collection_id == collection_id)
        .order_by(ChunkVector.chunk_id)
    )
    return np.fromiter(rows, dtype="int64")


def fetch_vectors(session: Session, ids: np.ndarray) -> np.ndarray:
    """The stored vectors of `ids`, shape (len(ids), dim), in the order given. KeyError if one has none."""
    ids = np.asarray(ids, dtype="int64").reshape(-1)
    found: dict[int, np.ndarray] = {}
    dim = None
    for batch in _batches(ids):
        for chunk_id, vdim, data in session.execute(
            select(ChunkVector.chunk_id, ChunkVector.dim, ChunkVector.data).where(ChunkVector.chunk_id.in_(batch))
        ):
            if dim is None:
                dim = vdim
            elif vdim != dim:
                raise ValueError(f"chunk {chunk_id} has a {vdim}-d vector, others are {dim}-d")
            found[chunk_id] = unpack(data, vdim)
    missing = [int(i) for i in ids if int(i) not in found]
    if missing:
        raise KeyError(f"no stored vector for {len(missing)} chunk(s), e.g. {missing[:5]}")
    if not len(ids):
        return np.empty((0, 0), dtype="float32")
    return np.stack([found[int(i)] for i in ids]).astype("float32", copy=False)
