"""Search a collection: query vector -> top-k chunks with their text, document id and metadata.

A `Searcher` is a read-only replica of the collections' indexes: before each search it reads the collection's
snapshot manifest (one small file), and when a writer has published a newer generation it loads it and reconciles
it with the vectors SQL holds (never writing a snapshot itself). So documents are searchable as soon as the worker
that indexed them has snapshotted, in every serving process, without a shared in-memory state.

Metadata filters are equality on top-level keys ({"lang": "en", "year": 2024}): FAISS returns candidates, SQL
joins their rows, and candidates failing the filter are dropped; the candidate pool grows until k hits pass or
the index is exhausted.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.engine import Engine

from .collections import get_collection
from .db import session_scope
from .errors import InvalidInput
from .index import CollectionIndex, IndexManager, IndexNotReady, IndexSpec
from .models import Chunk, Document
from .vectors import collection_vector_ids, fetch_vectors


@dataclass
class Hit:
    chunk_id: int
    external_id: str
    text: str
    score: float
    metadata: dict[str, Any]
    ordinal: int


class Searcher:
    def __init__(self, engine: Engine, index_root: Path):
        self.engine = engine
        self.manager = IndexManager(index_root)
        self._open: dict[str, tuple[int, CollectionIndex]] = {}
        self._lock = threading.Lock()

    def index(self, collection: str) -> CollectionIndex:
        """The collection's index as of its newest snapshot, reconciled with SQL (reloaded only when it changed)."""
        with session_scope(self.engine) as s:
            coll = get_collection(s, collection)
            cid, spec = coll.id, IndexSpec(dim=coll.dim, metric=coll.metric, kind=coll.index_kind)
        with self._lock:
            cached = self._open.get(collection)
            if cached is not None and cached[0] == cid:
                manifest = cached[1].read_manifest()
                if manifest is None or manifest.generation == cached[1].generation:
                    return cached[1]
            index = CollectionIndex(self.manager.folder(collection), spec)
            with session_scope(self.engine) as s:
                expected = collection_vector_ids(s, cid)
                try:
                    index.load(expected, lambda ids: fetch_vectors(s, ids))
                except IndexNotReady:  # ivf-pq with too few vectors to train: nothing searchable yet
                    index = CollectionIndex(self.manager.folder(collection), spec)
            self._open[collection] = (cid, index)
            return index

    def search(self, collection: str, query_vector: np.ndarray, k: int,
               filters: dict[str, Any] | None = None) -> list[Hit]:
        if not 1 <= int(k) <= 10_000:
            raise InvalidInput(f"k must be between 1 and 10000, got {k}")
        query = np.asarray(query_vector, dtype="float32").reshape(1, -1)
        index = self.index(collection)
        if query.shape[1] != index.spec.dim:
            raise InvalidInput(f"query vector has {query.shape[1]} dimensions; collection {collection!r} holds "
                               f"{index.spec.dim}")
        filters = filters or {}
        if not isinstance(filters, dict):
            raise InvalidInput("filters must be an object of metadata key -> value")
        fetch = k if not filters else k * 4
        while True:
            scores, ids = index.search(query, min(fetch, max(index.ntotal, 1)))
            found = [(int(i), float(sc)) for i, sc in zip(ids[0], scores[0]) if i >= 0]
            hits = self._join(found, filters)
            if len(hits) >= k or fetch >= index.ntotal:
                return hits[:k]
            fetch *= 4

    def _join(self, found: list[tuple[int, float]], filters: dict[str, Any]) -> list[Hit]:
        if not found:
            return []
        with session_scope(self.engine) as s:
            rows = {r.id: r for r in s.execute(
                select(Chunk.id, Chunk.text, Chunk.ordinal, Document.external_id, Document.meta)
                .join(Document, Document.id == Chunk.document_id)
                .where(Chunk.id.in_([i for i, _ in found]))
            )}
        hits = []
        for chunk, score in found:
            row = rows.get(chunk)
            if row is None:  # deleted after the snapshot was taken
                continue
            meta = row.meta or {}
            if any(meta.get(key) != value for key, value in filters.items()):
                continue
            hits.append(Hit(chunk, row.external_id, row.text, score, meta, row.ordinal))
        return hits
