"""FAISS index manager: idempotent writes, search, snapshots that survive crashes, reconcile with SQL."""

import json
import os
import subprocess
import sys
import textwrap

import faiss
import numpy as np
import pytest
from sieve.store import migrate
from sieve.store.db import make_engine, session_scope
from sieve.store.index import (
    MANIFEST,
    CollectionIndex,
    IndexManager,
    IndexNotReady,
    IndexSpec,
    SnapshotCorrupt,
    ids_checksum,
)
from sieve.store.models import Chunk, Collection, Document, chunk_id, content_hash
from sieve.store.vectors import collection_vector_ids, fetch_vectors, put_vectors
from sqlalchemy import delete

DIM = 16


def unit_vectors(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype("float32")
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def ids_of(n: int, start: int = 1000) -> np.ndarray:
    return np.arange(start, start + 7 * n, 7, dtype="int64")  # not 0..n-1, so ids != positions


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    """Tiny indexes: OpenMP threads only spin against each other (and against anything else on the machine)."""
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


@pytest.fixture
def index(tmp_path):
    return CollectionIndex(tmp_path / "coll", IndexSpec(dim=DIM))


def _search_ids(index, queries, k=1):
    return index.search(queries, k)[1]


# -- writes and search -------------------------------------------------------------------------------------------


def test_search_returns_the_ids_that_were_added(index):
    ids, vecs = ids_of(50), unit_vectors(50)
    assert index.add(ids, vecs) == 50
    scores, found = index.search(vecs, 3)
    assert found.shape == scores.shape == (50, 3)
    np.testing.assert_array_equal(found[:, 0], ids)  # each vector's nearest neighbour is itself
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)
    assert (scores[:, 0] >= scores[:, 1]).all()


def test_adding_the_same_batch_twice_equals_adding_it_once(index, tmp_path):
    ids, vecs = ids_of(40), unit_vectors(40)
    once = CollectionIndex(tmp_path / "once", IndexSpec(dim=DIM))
    once.add(ids, vecs)
    index.add(ids, vecs)
    index.add(ids, vecs)
    index.add(ids[10:20], vecs[10:20])  # a retried partial batch
    assert index.ntotal == once.ntotal == 40
    assert sorted(index.ids().tolist()) == sorted(ids.tolist())
    q = unit_vectors(5, seed=9)
    for a, b in zip(index.search(q, 10), once.search(q, 10)):
        np.testing.assert_array_equal(np.sort(a, axis=1), np.sort(b, axis=1))


def test_adding_an_existing_id_replaces_its_vector(index):
    ids, vecs = ids_of(10), unit_vectors(10)
    index.add(ids, vecs)
    new = unit_vectors(1, seed=5)
    index.add(ids[:1], new)
    assert index.ntotal == 10
    np.testing.assert_allclose(index.reconstruct(ids[:1]), new)
    assert _search_ids(index, new)[0, 0] == ids[0]


def test_remove_drops_only_present_ids(index):
    ids, vecs = ids_of(20), unit_vectors(20)
    index.add(ids, vecs)
    assert index.remove(np.array([ids[3], ids[4], 999_999_999])) == 2
    assert index.remove(np.array([ids[3]])) == 0
    assert index.ntotal == 18
    assert ids[3] not in index.ids() and ids[5] in index.ids()
    assert ids[3] not in index.search(vecs[3:4], 18)[1]


def test_search_on_an_empty_index_and_k_above_ntotal(index):
    scores, found = index.search(unit_vectors(2), 4)
    assert (found == -1).all() and np.isneginf(scores).all()
    index.add(ids_of(2), unit_vectors(2))
    found = _search_ids(index, unit_vectors(1), k=4)[0]
    assert sorted(found[:2].tolist()) == sorted(ids_of(2).tolist()) and (found[2:] == -1).all()


def test_bad_input_is_rejected_before_touching_the_index(index):
    index.add(ids_of(3), unit_vectors(3))
    with pytest.raises(ValueError, match="unique"):
        index.add(np.array([1, 1]), unit_vectors(2))
    with pytest.raises(ValueError, match=r"\(n, 16\)"):
        index.add(np.array([1]), np.ones((1, DIM + 1)))
    with pytest.raises(ValueError, match="2 ids for 3"):
        index.add(np.array([1, 2]), unit_vectors(3))
    with pytest.raises(ValueError, match="non-negative"):
        index.add(np.array([-1]), unit_vectors(1))
    assert index.ntotal == 3


def test_hnsw_adds_idempotently_and_removes_by_rebuilding(tmp_path):
    index = CollectionIndex(tmp_path / "h", IndexSpec(dim=DIM, kind="hnsw", hnsw_m=8))
    ids, vecs = ids_of(60), unit_vectors(60)
    assert index.add(ids, vecs) == 60
    assert index.add(ids, vecs) == 0  # unchanged: skipped, no rebuild
    assert index.ntotal == 60
    assert index.remove(ids[:10]) == 10
    assert index.ntotal == 50 and not np.isin(ids[:10], index.ids()).any()
    np.testing.assert_array_equal(_search_ids(index, vecs[10:])[:, 0], ids[10:])
    new = unit_vectors(1, seed=3)
    index.add(ids[20:21], new)  # replace
    assert index.ntotal == 50 and _search_ids(index, new)[0, 0] == ids[20]


def test_ivf_pq_trains_on_its_first_batch_and_supports_remove(tmp_path):
    spec = IndexSpec(dim=DIM, kind="ivf-pq", nlist=4, nprobe=4, pq_m=8, pq_nbits=4)
    index = CollectionIndex(tmp_path / "i", spec)
    with pytest.raises(IndexNotReady, match="at least 16"):
        index.add(ids_of(10), unit_vectors(10))
    ids, vecs = ids_of(200), unit_vectors(200)
    index.add(ids, vecs)
    index.add(ids[:50], vecs[:50])  # replace: remove_ids then add, through IVF's own id handling
    assert index.ntotal == 200 and sorted(index.ids().tolist()) == ids.tolist()
    assert index.remove(np.r_[ids[:5], 5]) == 5 and index.ntotal == 195
    assert index.remove(ids[:5]) == 0
    assert not np.isin(ids[:5], index.ids()).any()
    hits = _search_ids(index, vecs[100:200], k=5)
    assert np.mean([ids[100 + i] in row for i, row in enumerate(hits)]) > 0.8  # compressed: approximate
    index.snapshot()
    again = CollectionIndex(tmp_path / "i", spec)
    assert again.load().generation == 1 and sorted(again.ids().tolist()) == ids[5:].tolist()
    np.testing.assert_array_equal(again.search(vecs[100:110], 5)[1], index.search(vecs[100:110], 5)[1])


# -- snapshots ---------------------------------------------------------------------------------------------------


def test_snapshot_and_load_round_trip(index):
    ids, vecs = ids_of(30), unit_vectors(30)
    index.add(ids, vecs)
    manifest = index.snapshot()
    on_disk = json.loads((index.folder / MANIFEST).read_text())
    assert on_disk["ntotal"] == manifest.ntotal == 30 and on_disk["dim"] == DIM and on_disk["kind"] == "flat"
    assert on_disk["ids_sha256"] == ids_checksum(ids)
    assert (index.folder / manifest.file).stat().st_size == on_disk["bytes"]

    loaded = CollectionIndex(index.folder, IndexSpec(dim=DIM))
    report = loaded.load()
    assert (report.generation, report.snapshot_error, report.changed, report.ntotal) == (1, None, False, 30)
    assert sorted(loaded.ids().tolist()) == sorted(ids.tolist())
    q = unit_vectors(4, seed=1)
    for a, b in zip(loaded.search(q, 5), index.search(q, 5)):
        np.testing.assert_array_equal(a, b)


def test_snapshots_advance_generations_and_keep_only_the_previous_one(index):
    index.add(ids_of(3), unit_vectors(3))
    for expected in (1, 2, 3, 4):
        assert index.snapshot().generation == expected
    files = sorted(p.name for p in index.folder.iterdir())
    assert files == ["index.000000000003.faiss", "index.000000000004.faiss", MANIFEST]


def test_load_with_a_mismatched_spec_is_an_error_not_a_rebuild(index):
    index.add(ids_of(3), unit_vectors(3))
    index.snapshot()
    with pytest.raises(ValueError, match="dim 16"):
        CollectionIndex(index.folder, IndexSpec(dim=8)).load(np.array([1]), lambda ids: np.ones((len(ids), 8)))


def test_stray_and_truncated_temp_files_are_ignored_and_cleaned(index):
    ids, vecs = ids_of(25), unit_vectors(25)
    index.add(ids, vecs)
    good = index.snapshot()
    data = (index.folder / good.file).read_bytes()
    # a writer killed mid-write leaves truncated temps of both the next index file and the next manifest
    (index.folder / f".index.{2:012d}.faiss.tmp-999-deadbeef").write_bytes(data[: len(data) // 3])
    (index.folder / f".{MANIFEST}.tmp-999-deadbeef").write_text('{"format": 1, "generation": 2, "fi')
    loaded = CollectionIndex(index.folder, IndexSpec(dim=DIM))
    assert loaded.load().generation == 1
    assert sorted(loaded.ids().tolist()) == sorted(ids.tolist())
    loaded.add(ids_of(1, start=5), unit_vectors(1, seed=4))
    assert loaded.snapshot().generation == 2
    assert not list(index.folder.glob(".*tmp*"))  # the next writer removed them


def test_corrupt_snapshot_is_an_error_without_vectors_and_a_rebuild_with_them(index):
    ids, vecs = ids_of(20), unit_vectors(20)
    index.add(ids, vecs)
    manifest = index.snapshot()
    path = index.folder / manifest.file
    path.write_bytes(path.read_bytes()[:-100])  # damaged after it was committed (disk, manual copy, ...)
    with pytest.raises(SnapshotCorrupt, match="sha256"):
        CollectionIndex(index.folder, IndexSpec(dim=DIM)).load()
    store = dict(zip(ids.tolist(), vecs))
    rebuilt = CollectionIndex(index.folder, IndexSpec(dim=DIM))
    report = rebuilt.load(ids, lambda want: np.stack([store[int(i)] for i in want]))
    assert report.generation is None and "sha256" in report.snapshot_error and report.added == 20
    np.testing.assert_array_equal(_search_ids(rebuilt, vecs)[:, 0], ids)


def test_unreadable_manifest_is_corrupt(index):
    index.add(ids_of(2), unit_vectors(2))
    index.snapshot()
    (index.folder / MANIFEST).write_text("{not json")
    with pytest.raises(SnapshotCorrupt, match="manifest.json"):
        CollectionIndex(index.folder, IndexSpec(dim=DIM)).load()


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from sieve.store.index import CollectionIndex, IndexSpec

    folder, kill_at = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    index = CollectionIndex(folder, IndexSpec(dim=16))
    index.add(np.arange(100, dtype="int64"), rng.standard_normal((100, 16)))
    index.snapshot()                                                  # generation 1: ids 0..99
    index.add(np.arange(100, 300, dtype="int64"), rng.standard_normal((200, 16)))
    index.remove(np.arange(10, dtype="int64"))                        # generation 2 would be ids 10..299

    calls = 0
    def dying(real):
        def call(*args):
            global calls
            calls += 1
            if calls == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)                  # no cleanup, no finally: like kill -9
            return real(*args)
        return call
    os.fsync, os.replace = dying(os.fsync), dying(os.replace)
    index.snapshot()
    print("finished")
""")


@pytest.mark.parametrize("kill_at", [1, 2, 3, 4, 5, 6])
def test_killed_during_snapshot_still_loads_a_whole_snapshot(tmp_path, kill_at):
    """kill -9 before each fsync / rename of a snapshot: the last committed snapshot (or the new one once its
    manifest is renamed) loads, with exactly its ids. Calls in order: fsync(index temp), rename(index),
    fsync(dir), fsync(manifest temp), rename(manifest) = the commit, fsync(dir)."""
    folder = tmp_path / "c"
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT, str(folder), str(kill_at)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -9 and "finished" not in proc.stdout, proc.stderr
    index = CollectionIndex(folder, IndexSpec(dim=16))
    report = index.load()
    committed = kill_at == 6  # killed after the manifest's rename
    assert report.generation == (2 if committed else 1)
    expected = np.arange(10, 300) if committed else np.arange(100)
    assert sorted(index.ids().tolist()) == expected.tolist()
    # and the next snapshot from this state succeeds and leaves no debris
    index.add(np.array([1000]), unit_vectors(1))
    assert index.snapshot().generation >= 2
    assert not list(folder.glob(".*tmp*"))
    assert CollectionIndex(folder, IndexSpec(dim=16)).load().ntotal == len(expected) + 1


# -- reconcile ---------------------------------------------------------------------------------------------------


def test_load_reconciles_adds_missing_and_drops_deleted(index):
    ids, vecs = ids_of(30), unit_vectors(30)
    index.add(ids[:20], vecs[:20])
    index.snapshot()  # the snapshot has 0..19; meanwhile SQL got 20..29 and lost 0..4
    expected = ids[5:]
    store = dict(zip(ids.tolist(), vecs))
    fetched = []

    def fetch(want):
        fetched.extend(want.tolist())
        return np.stack([store[int(i)] for i in want])

    loaded = CollectionIndex(index.folder, IndexSpec(dim=DIM))
    report = loaded.load(expected, fetch, batch_size=4)
    assert (report.generation, report.added, report.removed, report.ntotal) == (1, 10, 5, 25)
    assert sorted(fetched) == ids[20:].tolist()  # only the missing ones were fetched
    assert sorted(loaded.ids().tolist()) == sorted(expected.tolist())
    np.testing.assert_array_equal(_search_ids(loaded, vecs[5:])[:, 0], expected)
    assert loaded.load(expected, fetch).generation == 1  # not written back by load
    loaded.load(expected, fetch)
    loaded.snapshot()
    again = CollectionIndex(index.folder, IndexSpec(dim=DIM)).load(expected, fetch)
    assert (again.added, again.removed, again.changed) == (0, 0, False)


def test_reconcile_from_sql_after_documents_change(tmp_path):
    url = f"sqlite:///{tmp_path / 'sieve.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    vecs = unit_vectors(12)
    with session_scope(engine) as s:
        coll = Collection(name="docs", embedder="e", dim=DIM)
        docs = [Document(collection=coll, external_id=f"d{i}", text=f"t{i}", content_hash=content_hash(f"t{i}"))
                for i in range(4)]
        chunks = [Chunk(id=chunk_id("docs", d.external_id, d.content_hash, o), document=d, ordinal=o, text="x",
                        token_start=0, token_end=1) for d in docs for o in range(3)]
        s.add_all(docs)
        s.flush()
        chunk_ids = np.array([c.id for c in chunks], dtype="int64")
        put_vectors(s, chunk_ids, vecs)
        coll_id, gone_doc = coll.id, docs[1].id

    manager = IndexManager(tmp_path / "indexes")
    index = manager.open("docs", IndexSpec(dim=DIM))
    index.add(chunk_ids[:6], vecs[:6])  # crashed before adding the rest
    index.snapshot()
    with session_scope(engine) as s:
        s.execute(delete(Document).where(Document.id == gone_doc))  # its chunks and vectors cascade

    fresh = IndexManager(tmp_path / "indexes").open("docs", IndexSpec(dim=DIM))
    with session_scope(engine) as s:
        report = fresh.load(collection_vector_ids(s, coll_id), lambda ids: fetch_vectors(s, ids))
    assert (report.added, report.removed) == (6, 3)
    expected = np.delete(chunk_ids, [3, 4, 5])
    assert sorted(fresh.ids().tolist()) == sorted(expected.tolist())
    np.testing.assert_array_equal(_search_ids(fresh, np.delete(vecs, [3, 4, 5], axis=0))[:, 0], expected)
    engine.dispose()


# -- manager -----------------------------------------------------------------------------------------------------


def test_manager_opens_each_collection_once_and_drops_its_files(tmp_path):
    manager = IndexManager(tmp_path)
    a = manager.open("a", IndexSpec(dim=DIM))
    assert manager.open("a", IndexSpec(dim=DIM)) is a
    with pytest.raises(ValueError, match="is open as"):
        manager.open("a", IndexSpec(dim=8))
    for bad in ("../etc", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="collection name"):
            manager.open(bad, IndexSpec(dim=DIM))
    a.add(ids_of(2), unit_vectors(2))
    a.snapshot()
    assert (tmp_path / "a" / MANIFEST).exists()
    manager.drop("a")
    assert not (tmp_path / "a").exists()
    assert manager.open("a", IndexSpec(dim=DIM)).ntotal == 0


def test_spec_validation():
    assert IndexSpec(dim=8).factory == "IDMap2,Flat"
    assert IndexSpec(dim=8, kind="hnsw", hnsw_m=16).factory == "IDMap2,HNSW16"
    assert IndexSpec(dim=8, kind="ivf-pq", nlist=64, pq_m=4).factory == "IVF64,PQ4x8"
    for bad in (dict(dim=0), dict(dim=8, metric="cos"), dict(dim=8, kind="lsh"), dict(dim=10, kind="ivf-pq", pq_m=4)):
        with pytest.raises(ValueError):
            IndexSpec(**bad)
