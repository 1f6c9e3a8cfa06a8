"""The one writer of a collection's FAISS index at a time, across worker processes.

`collection_lock` serializes writers of one collection: an exclusive `flock` on `<index root>/.locks/<name>.lock`
(every process on this host, and on hosts sharing the index folder over a filesystem with working locks), plus a
PostgreSQL advisory lock when the store is PostgreSQL (workers on other hosts). Under the lock, `IndexWriter.apply`
brings its in-memory copy up to date (if another process wrote a newer snapshot, or this process never loaded one,
it loads the newest and reconciles it with the vectors SQL holds), removes and adds ids, and writes a snapshot
(temp file, fsync, rename). Any error drops the in-memory copy, so the next apply starts again from disk + SQL:
the index on disk never needs to be trusted further than "a consistent snapshot, reconciled with SQL on load".
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from sieve.store.db import session_scope
from sieve.store.index import CollectionIndex, IndexManager, IndexNotReady, IndexSpec
from sieve.store.models import Collection
from sieve.store.vectors import collection_vector_ids, fetch_vectors
from sqlalchemy import text
from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


def _advisory_key(name: str) -> int:
    digest = hashlib.blake2b(f"sieve-index:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


@contextmanager
def collection_lock(engine: Engine, index_root: Path, name: str) -> Iterator[None]:
    """Exclusive right to write collection `name`'s index (blocks until it is free)."""
    IndexManager(index_root).folder(name)  # validates the name before it becomes a path
    with _thread_locks_guard:
        tlock = _thread_locks.setdefault(name, threading.Lock())
    folder = Path(index_root) / ".locks"
    folder.mkdir(parents=True, exist_ok=True)
    with tlock, open(folder / f"{name}.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if engine.dialect.name == "postgresql":
                with engine.connect() as conn:
                    key = _advisory_key(name)
                    conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": key})
                    try:
                        yield
                    finally:
                        conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                        conn.commit()
            else:
                yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def spec_of(collection: Collection) -> IndexSpec:
    return IndexSpec(dim=collection.dim, metric=collection.metric, kind=collection.index_kind)


def load_reconciled(engine: Engine, index: CollectionIndex, collection_id: int):
    """Load `index`'s newest snapshot and reconcile it with the vectors SQL holds for the collection."""
    with session_scope(engine) as s:
        expected = collection_vector_ids(s, collection_id)
        return index.load(expected, lambda ids: fetch_vectors(s, ids))


class IndexWriter:
    """Applies batches of removals and additions to collections' indexes, one writer per collection at a time."""

    def __init__(self, engine: Engine, index_root: Path):
        self.engine = engine
        self.root = Path(index_root)
        self.manager = IndexManager(self.root)
        self._cache: dict[str, tuple[int, CollectionIndex]] = {}  # name -> (collection id, index)

    def apply(self, collection: Collection, *, remove: np.ndarray | None = None, add_ids: np.ndarray | None = None,
              add_vectors: np.ndarray | None = None) -> int:
        """Remove `remove`, then add (`add_ids`, `add_vectors`), then snapshot. Returns the index's ntotal."""
        name = collection.name
        with collection_lock(self.engine, self.root, name):
            try:
                index = self._current(collection)
                if remove is not None and len(remove):
                    index.remove(np.asarray(remove, dtype="int64"))
                if add_ids is not None and len(add_ids):
                    try:
                        index.add(np.asarray(add_ids, dtype="int64"), np.asarray(add_vectors, dtype="float32"))
                    except IndexNotReady as e:  # ivf-pq with too few vectors to train: SQL keeps them for later
                        log.info("index of %s not trained yet (%s); vectors kept in SQL", name, e)
                        self._cache.pop(name, None)
                        return index.ntotal
                index.snapshot()
                return index.ntotal
            except BaseException:
                self._cache.pop(name, None)  # start again from disk + SQL next time
                raise

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)

    def _current(self, collection: Collection) -> CollectionIndex:
        cached = self._cache.get(collection.name)
        folder = self.manager.folder(collection.name)
        if cached is not None and cached[0] == collection.id:
            index = cached[1]
            manifest = index.read_manifest()
            if manifest is not None and manifest.generation == index.generation:
                return index
        index = CollectionIndex(folder, spec_of(collection))
        try:
            report = load_reconciled(self.engine, index, collection.id)
        except IndexNotReady:
            index = CollectionIndex(folder, spec_of(collection))  # not enough vectors to train yet: start empty
        else:
            if report.changed or report.snapshot_error:
                log.info("index of %s reconciled with SQL: +%d -%d%s", collection.name, report.added,
                         report.removed, f" (snapshot unusable: {report.snapshot_error})" if report.snapshot_error
                         else "")
        self._cache[collection.name] = (collection.id, index)
        return index
