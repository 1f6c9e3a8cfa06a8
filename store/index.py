"""Per-collection FAISS indexes: ID-mapped, idempotent writes, crash-safe snapshots, reconciled with SQL on load.

The index knows nothing about SQL, embedders or Celery. It holds (chunk id, vector) pairs, where ids are the stable
64-bit chunk ids of `models.chunk_id`, and is told by its caller which ids should exist and how to fetch their
vectors (`load(expected_ids, fetch)`; `vectors.py` provides both from SQL).

Kinds (`IndexSpec.kind`), all built with `faiss.index_factory`; ids are ours, and `reconstruct(ids)` works:

    flat    "IDMap2,Flat"  exact search; the default, right up to a few million vectors
    hnsw    "IDMap2,HNSW{hnsw_m}"
            graph, fast approximate search, no training. FAISS cannot remove from it, so replacing or removing
            ids rebuilds the graph (O(n)): for collections that mostly grow
    ivf-pq  "IVF{nlist},PQ{pq_m}x{pq_nbits}"
            compressed (pq_m x pq_nbits bits a vector), for collections past a few million. Trained on the first
            batch added (or on the rebuild in `load`), which must hold at least max(nlist, 2**pq_nbits) vectors.
            IVF stores ids itself, so it is not wrapped in IndexIDMap2 (whose remove_ids assumes the inner index
            keeps its order, which IVF does not); a hashtable direct map gives removal and reconstruct by id

Writes are idempotent: `add` first removes the ids it is given, so adding a batch twice leaves the index as adding
it once (for hnsw, an id already present with the same vector is skipped instead of rebuilding).

Where the vectors are kept durably: in SQL (`chunk_vectors`, float32 bytes), not in a file beside the index. The
vector row is written in the same transaction as its chunk row, so "SQL has the chunk" and "a vector exists to
index it" can never disagree, there is one crash-consistency story instead of two, and every host that can reach
the database (a second worker, a serving replica) can rebuild an index without a shared filesystem. The cost is a
read of n x dim x 4 bytes from the database on a full rebuild, which only happens without a usable snapshot.

Snapshots live in `<folder>/`: `index.<generation>.faiss` plus `manifest.json` (generation, file size and sha256,
ntotal, dim, metric, kind, sha256 of the sorted ids). Each is written to a temp file, fsynced and renamed; the
manifest's rename is the commit point, and the generation the previous manifest named is kept one round so a
reader that read the old manifest still finds its file. A crash at any moment therefore leaves a manifest naming
a complete, verified file; stray temp files are ignored by readers and removed by the next snapshot. A snapshot
that fails verification is rebuilt from the durable vectors when `load` is given them, and is an error otherwise.

Concurrency: one `threading.Lock` per collection serializes writes and searches in this process (FAISS does not
allow a search during an add or remove); a second lock keeps snapshots of one collection one at a time, and the
file is written outside the index lock. Serializing writers across processes and hosts (one index writer per
collection) is the workers' job, not this module's.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = 1
MANIFEST = "manifest.json"
_INDEX_FILE = re.compile(r"^index\.(\d{12})\.faiss$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")

# fetch(ids) -> float32 vectors of shape (len(ids), dim), row i being the vector of ids[i]
FetchVectors = Callable[[np.ndarray], np.ndarray]


class SnapshotCorrupt(RuntimeError):
    """A snapshot exists but does not match its manifest (or the manifest is unreadable)."""


class IndexNotReady(ValueError):
    """An index that needs training got too few vectors to train on."""


@dataclass(frozen=True)
class IndexSpec:
    """What kind of index a collection has. Stored in each snapshot's manifest; a loaded snapshot must match it."""

    dim: int
    metric: str = "ip"  # "ip" (inner product: cosine on normalized vectors) or "l2"
    kind: str = "flat"  # "flat", "hnsw" or "ivf-pq" (see the module docstring)
    hnsw_m: int = 32  # graph degree
    ef_search: int = 64  # hnsw search breadth
    nlist: int = 1024  # ivf cells
    nprobe: int = 16  # ivf cells visited per query
    pq_m: int = 16  # pq sub-quantizers; must divide dim
    pq_nbits: int = 8  # bits per sub-quantizer code

    def __post_init__(self):
        if self.dim <= 0:
            raise ValueError(f"dim must be positive, got {self.dim}")
        if self.metric not in ("ip", "l2"):
            raise ValueError(f"metric {self.metric!r} is not ip or l2")
        if self.kind not in ("flat", "hnsw", "ivf-pq"):
            raise ValueError(f"index kind {self.kind!r} is not flat, hnsw or ivf-pq")
        if self.kind == "ivf-pq" and self.dim % self.pq_m:
            raise ValueError(f"ivf-pq needs pq_m ({self.pq_m}) to divide dim ({self.dim})")

    @property
    def factory(self) -> str:
        return {"flat": "IDMap2,Flat", "hnsw": f"IDMap2,HNSW{self.hnsw_m}",
                "ivf-pq": f"IVF{self.nlist},PQ{self.pq_m}x{self.pq_nbits}"}[self.kind]

    @property
    def faiss_metric(self) -> int:
        return faiss.METRIC_INNER_PRODUCT if self.metric == "ip" else faiss.METRIC_L2

    @property
    def min_train(self) -> int:
        return max(self.nlist, 2**self.pq_nbits) if self.kind == "ivf-pq" else 0

    def build(self) -> faiss.Index:
        index = faiss.index_factory(self.dim, self.factory, self.faiss_metric)
        if self.kind == "ivf-pq":
            index.set_direct_map_type(faiss.DirectMap.Hashtable)
        self.tune(index)
        return index

    def tune(self, index: faiss.Index) -> None:
        """Set the search-time parameters (not all of them survive serialization)."""
        if self.kind == "hnsw":
            faiss.ParameterSpace().set_index_parameter(index, "efSearch", self.ef_search)
        elif self.kind == "ivf-pq":
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", self.nprobe)


@dataclass(frozen=True)
class Manifest:
    format: int
    generation: int
    file: str
    bytes: int
    sha256: str
    ntotal: int
    dim: int
    metric: str
    kind: str
    factory: str
    ids_sha256: str
    created: str


@dataclass(frozen=True)
class LoadReport:
    generation: int | None  # the snapshot loaded; None: none on disk, or it was unusable
    snapshot_error: str | None  # why a snapshot on disk was not used
    added: int  # ids fetched from the durable vectors because the snapshot lacked them
    removed: int  # ids in the snapshot that are no longer expected
    ntotal: int

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def index_ids(index: faiss.Index) -> np.ndarray:
    """Every id an index holds (IndexIDMap2: its id map; IVF: its inverted lists), unordered."""
    if hasattr(index, "id_map"):
        return faiss.vector_to_array(index.id_map).astype("int64")
    lists = faiss.extract_index_ivf(index).invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy() for i in range(lists.nlist)]
    return np.concatenate(parts).astype("int64") if parts else np.empty(0, "int64")


def ids_checksum(ids: np.ndarray) -> str:
    return hashlib.sha256(np.sort(np.asarray(ids, dtype="<i8")).tobytes()).hexdigest()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes | memoryview) -> None:
    """Write `data` to `path` so that `path` is either absent/old or complete: temp file, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class CollectionIndex:
    """One collection's FAISS index in memory, and its snapshots in `folder`."""

    def __init__(self, folder: Path, spec: IndexSpec):
        self.folder = Path(folder)
        self.spec = spec
        self._index: faiss.Index = spec.build()
        self._lock = threading.Lock()
        self._snapshot_lock = threading.Lock()
        self._generation: int | None = None

    # -- reads -------------------------------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def generation(self) -> int | None:
        """The snapshot generation last loaded or written (None: never)."""
        return self._generation

    def ids(self) -> np.ndarray:
        with self._lock:
            return self._ids_locked()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) for each query row, each (n, k); an id of -1 marks an empty slot (k > ntotal)."""
        queries = self._as_vectors(queries)
        if k <= 0:
            raise ValueError(f"k must be positive, got {k}")
        with self._lock:
            if self._index.ntotal == 0 or not self._index.is_trained:
                empty = -np.inf if self.spec.metric == "ip" else np.inf
                return np.full((len(queries), k), empty, "float32"), np.full((len(queries), k), -1, "int64")
            return self._index.search(queries, k)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of `ids` (for ivf-pq, decoded from their compressed codes: approximate)."""
        with self._lock:
            return self._index.reconstruct_batch(self._as_ids(ids))

    # -- writes ------------------------------------------------------------------------------------------------

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> int:
        """Insert or replace the vectors of `ids` (unique within the call). Returns the number written (for hnsw,
        ids already present with an identical vector are left alone and not counted)."""
        ids, vectors = self._as_ids(ids), self._as_vectors(vectors)
        if len(ids) != len(vectors):
            raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
        if len(np.unique(ids)) != len(ids):
            raise ValueError("ids must be unique within one add")
        if len(ids) == 0:
            return 0
        with self._lock:
            if self.spec.kind == "hnsw":
                ids, vectors = self._drop_unchanged_locked(ids, vectors)
                if len(ids) == 0:
                    return 0
            self._train_locked(vectors)
            self._remove_locked(ids)
            self._index.add_with_ids(vectors, ids)
        return len(ids)

    def remove(self, ids: np.ndarray) -> int:
        """Remove `ids` (those present); returns how many were removed."""
        ids = self._as_ids(ids)
        with self._lock:
            return self._remove_locked(ids)

    # -- snapshots ---------------------------------------------------------------------------------------------

    def snapshot(self) -> Manifest:
        """Write the index and its manifest to `folder` (temp, fsync, rename; the manifest last)."""
        with self._snapshot_lock:
            self.folder.mkdir(parents=True, exist_ok=True)
            for stray in self.folder.glob(".*.tmp-*"):  # left by a writer that died; we are the only writer
                stray.unlink(missing_ok=True)
            with self._lock:  # copy out under the lock, write outside it
                data = faiss.serialize_index(self._index)
                ids = self._ids_locked()
            try:
                previous = self.read_manifest()
            except SnapshotCorrupt:
                previous = None
            generation = max(self._generations_on_disk(), default=0) + 1
            name = f"index.{generation:012d}.faiss"
            _atomic_write(self.folder / name, memoryview(data))
            manifest = Manifest(
                format=SNAPSHOT_FORMAT, generation=generation, file=name, bytes=int(data.nbytes),
                sha256=hashlib.sha256(data).hexdigest(), ntotal=len(ids), dim=self.spec.dim,
                metric=self.spec.metric, kind=self.spec.kind, factory=self.spec.factory, ids_sha256=ids_checksum(ids),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            )
            _atomic_write(self.folder / MANIFEST, json.dumps(asdict(manifest), indent=1).encode())
            self._generation = generation
            keep = {generation, previous.generation if previous else None}
            for old in self._generations_on_disk():
                if old not in keep:  # older ones, and any orphan of a snapshot that died before its manifest
                    (self.folder / f"index.{old:012d}.faiss").unlink(missing_ok=True)
            return manifest

    def load(self, expected_ids: np.ndarray | None = None, fetch: FetchVectors | None = None,
             batch_size: int = 65536) -> LoadReport:
        """Replace the in-memory index with the latest snapshot, then reconcile it with `expected_ids`.

        With `expected_ids` (the ids SQL has vectors for), ids the snapshot lacks are fetched with `fetch` and added,
        and ids it has that are no longer expected are removed. Without a snapshot, or with one that fails
        verification, the index is rebuilt from `fetch` alone; a bad snapshot with nothing to rebuild from raises
        SnapshotCorrupt. The reconciled index is not written back: call `snapshot()` if `report.changed` (a
        read-only replica should not).
        """
        if (expected_ids is None) != (fetch is None):
            raise ValueError("pass expected_ids and fetch together")
        with self._snapshot_lock:
            error, generation = None, None
            try:
                loaded = self._read_snapshot()
            except SnapshotCorrupt as e:
                if expected_ids is None:
                    raise
                log.warning("index snapshot in %s is unusable (%s); rebuilding from stored vectors", self.folder, e)
                loaded, error = None, str(e)
            if loaded is None:
                index = self.spec.build()
            else:
                index, generation = loaded
                self.spec.tune(index)
            added = removed = 0
            if expected_ids is not None:
                expected = self._as_ids(expected_ids)
                present = index_ids(index)
                gone = present[~np.isin(present, expected)]
                missing = expected[~np.isin(expected, present)]
                with self._lock:
                    self._index, self._generation = index, generation
                    removed = self._remove_locked(gone)
                for start in range(0, len(missing), batch_size):
                    part = missing[start:start + batch_size]
                    vectors = self._as_vectors(fetch(part))
                    if len(vectors) != len(part):
                        raise ValueError(f"fetch returned {len(vectors)} vectors for {len(part)} ids")
                    added += self.add(part, vectors)
            else:
                with self._lock:
                    self._index, self._generation = index, generation
            return LoadReport(generation, error, added, removed, self.ntotal)

    def read_manifest(self) -> Manifest | None:
        path = self.folder / MANIFEST
        if not path.exists():
            return None
        try:
            return Manifest(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise SnapshotCorrupt(f"{path}: {type(e).__name__}: {e}") from e

    # -- internals ---------------------------------------------------------------------------------------------

    def _read_snapshot(self) -> tuple[faiss.Index, int] | None:
        manifest = self.read_manifest()
        if manifest is None:
            return None
        if manifest.format != SNAPSHOT_FORMAT:
            raise SnapshotCorrupt(f"snapshot format {manifest.format} != {SNAPSHOT_FORMAT}")
        if (manifest.dim, manifest.metric, manifest.kind) != (self.spec.dim, self.spec.metric, self.spec.kind):
            raise ValueError(  # not corruption: the caller's spec is wrong, rebuilding would hide it
                f"snapshot in {self.folder} is {manifest.kind}/{manifest.metric}/dim {manifest.dim}, "
                f"expected {self.spec.kind}/{self.spec.metric}/dim {self.spec.dim}"
            )
        path = self.folder / manifest.file
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SnapshotCorrupt(f"{path}: {e}") from e
        if len(data) != manifest.bytes or hashlib.sha256(data).hexdigest() != manifest.sha256:
            raise SnapshotCorrupt(f"{path} is {len(data)} bytes / sha256 differs from its manifest")
        try:
            index = faiss.deserialize_index(np.frombuffer(data, dtype="uint8"))
        except RuntimeError as e:
            raise SnapshotCorrupt(f"{path}: faiss cannot read it: {e}") from e
        ids = index_ids(index)
        if index.ntotal != manifest.ntotal or ids_checksum(ids) != manifest.ids_sha256:
            raise SnapshotCorrupt(f"{path}: ids do not match the manifest")
        return index, manifest.generation

    def _generations_on_disk(self) -> list[int]:
        return sorted(int(m.group(1)) for p in self.folder.iterdir() if (m := _INDEX_FILE.match(p.name)))

    def _ids_locked(self) -> np.ndarray:
        return index_ids(self._index)

    def _remove_locked(self, ids: np.ndarray) -> int:
        if len(ids) == 0 or self._index.ntotal == 0:
            return 0
        if self.spec.kind == "flat":
            return int(self._index.remove_ids(ids))
        if self.spec.kind == "ivf-pq":  # the hashtable direct map removes only by an explicit id array
            ids = np.ascontiguousarray(ids, dtype="int64")
            return int(self._index.remove_ids(faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))))
        present = self._ids_locked()
        keep = ~np.isin(present, ids)
        if keep.all():
            return 0
        kept_ids = present[keep]
        kept = self._index.reconstruct_batch(kept_ids) if len(kept_ids) else np.empty((0, self.spec.dim), "float32")
        self._index = self.spec.build()  # HNSW cannot delete: rebuild the graph without them
        if len(kept_ids):
            self._index.add_with_ids(kept, kept_ids)
        return int((~keep).sum())

    def _drop_unchanged_locked(self, ids: np.ndarray, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        present = np.isin(ids, self._ids_locked())
        if not present.any():
            return ids, vectors
        same = np.zeros(len(ids), dtype=bool)
        same[present] = (self._index.reconstruct_batch(ids[present]) == vectors[present]).all(axis=1)
        return ids[~same], vectors[~same]

    def _train_locked(self, vectors: np.ndarray) -> None:
        if self._index.is_trained or len(vectors) == 0:
            return
        if len(vectors) < self.spec.min_train:
            raise IndexNotReady(
                f"an untrained {self.spec.kind} index needs at least {self.spec.min_train} vectors in its first "
                f"batch, got {len(vectors)}: add a bigger batch, or load() from the stored vectors"
            )
        self._index.train(vectors)
        self.spec.tune(self._index)

    def _as_ids(self, ids) -> np.ndarray:
        ids = np.ascontiguousarray(np.asarray(ids).reshape(-1), dtype="int64")
        if (ids < 0).any():
            raise ValueError("ids must be non-negative int64 (see models.chunk_id)")
        return ids

    def _as_vectors(self, vectors) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, dtype="float32")
        if vectors.ndim != 2 or vectors.shape[1] != self.spec.dim:
            raise ValueError(f"vectors must be (n, {self.spec.dim}), got {vectors.shape}")
        return vectors


class IndexManager:
    """Every collection's index under one root folder, `<root>/<collection name>/`, opened once per process."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._open: dict[str, CollectionIndex] = {}
        self._lock = threading.Lock()

    def folder(self, name: str) -> Path:
        if not _SAFE_NAME.match(name):
            raise ValueError(f"collection name {name!r}: use letters, digits, '.', '_' and '-' (max 200)")
        return self.root / name

    def open(self, name: str, spec: IndexSpec) -> CollectionIndex:
        """The collection's index, created empty on first use in this process (call `load` to read snapshots)."""
        with self._lock:
            index = self._open.get(name)
            if index is None:
                index = self._open[name] = CollectionIndex(self.folder(name), spec)
            elif index.spec != spec:
                raise ValueError(f"collection {name!r} is open as {index.spec}, not {spec}")
            return index

    def drop(self, name: str) -> None:
        """Forget the collection's index and delete its snapshots."""
        folder = self.folder(name)
        with self._lock:
            self._open.pop(name, None)
            shutil.rmtree(folder, ignore_errors=True)
