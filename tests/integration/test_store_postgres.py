"""The SQL store on the real local PostgreSQL: each test gets a fresh database `sieve_test_<random>`, dropped after.

The server is `SIEVE_TEST_POSTGRES` (default postgresql://postgres@127.0.0.1:5432/postgres, trust auth).
"""

import threading

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sieve.store import migrate
from sieve.store.db import make_engine, session_scope
from sieve.store.index import CollectionIndex, IndexSpec
from sieve.store.models import Base, Chunk, Collection, Document, Job, chunk_id, content_hash
from sieve.store.vectors import collection_vector_ids, fetch_vectors, put_vectors
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

pytestmark = pytest.mark.integration

TABLES = {"collections", "documents", "chunks", "chunk_vectors", "jobs", "job_batches", "chunk_blocks", "api_keys"}


@pytest.fixture
def engine(pg_url):
    migrate.upgrade(pg_url)
    engine = make_engine(pg_url)
    yield engine
    engine.dispose()


def test_upgrade_creates_the_schema_and_twice_is_a_no_op(pg_url):
    assert migrate.current(pg_url) is None
    migrate.upgrade(pg_url)
    assert migrate.current(pg_url) == migrate.head()
    engine = make_engine(pg_url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
        with session_scope(engine) as s:
            s.add(Collection(name="kept", embedder="e", dim=4))
        migrate.upgrade(pg_url)
        assert migrate.current(pg_url) == migrate.head()
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
            assert c.execute(text("SELECT name FROM collections")).scalars().all() == ["kept"]
            columns = {col["name"]: col["type"] for col in inspect(c).get_columns("documents")}
            assert type(columns["metadata"]).__name__ == "JSONB"
            diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
        assert diff == []
    finally:
        engine.dispose()


def test_concurrent_upgrades_take_turns(pg_url):
    errors = []

    def run():
        try:
            migrate.upgrade(pg_url)
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "an upgrade hung"
    assert errors == [] and migrate.current(pg_url) == migrate.head()


def test_downgrade_to_base_and_back(pg_url):
    migrate.upgrade(pg_url)
    migrate.downgrade(pg_url, "base")
    assert migrate.current(pg_url) is None
    engine = make_engine(pg_url)
    try:
        assert not TABLES & set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    migrate.upgrade(pg_url)
    assert migrate.current(pg_url) == migrate.head()


def test_constraints_on_postgres(engine):
    with session_scope(engine) as s:
        a, b = Collection(name="a", embedder="e", dim=4), Collection(name="b", embedder="e", dim=4)
        s.add_all([Document(collection=c, external_id="x", text="t", content_hash=content_hash("t"),
                            meta={"k": [1, "é"]}) for c in (a, b)])
    with pytest.raises(IntegrityError, match="uq_documents_collection_id_external_id"), session_scope(engine) as s:
        a = s.scalar(select(Collection).where(Collection.name == "a"))
        s.add(Document(collection=a, external_id="x", text="t2", content_hash=content_hash("t2")))
    with pytest.raises(IntegrityError, match="ck_jobs_status"), session_scope(engine) as s:
        s.add(Job(kind="upsert", status="lost"))
    with session_scope(engine) as s:
        docs = s.scalars(select(Document).order_by(Document.id)).all()
        assert [d.meta for d in docs] == [{"k": [1, "é"]}] * 2 and len(docs) == 2


def test_cascade_vectors_and_reconcile_on_postgres(engine, tmp_path):
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((9, 8)).astype("float32")
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)  # inner product on unit vectors: each is its own best match
    with session_scope(engine) as s:
        coll = Collection(name="c", embedder="e", dim=8)
        docs = [Document(collection=coll, external_id=f"d{i}", text=f"t{i}", content_hash=content_hash(f"t{i}"))
                for i in range(3)]
        chunks = [Chunk(id=chunk_id("c", d.external_id, d.content_hash, o), document=d, ordinal=o, text="x",
                        token_start=0, token_end=1) for d in docs for o in range(3)]
        s.add_all(docs + [Chunk(id=2**63 - 1, document=docs[0], ordinal=99, text="max", token_start=0, token_end=0)])
        s.flush()
        ids = np.array([c.id for c in chunks], dtype="int64")
        put_vectors(s, ids, vecs)
        coll_id = coll.id
    with session_scope(engine) as s:
        assert s.scalar(select(Chunk.id).where(Chunk.ordinal == 99)) == 2**63 - 1
        np.testing.assert_array_equal(fetch_vectors(s, ids[::-1]), vecs[::-1])

    index = CollectionIndex(tmp_path / "c", IndexSpec(dim=8))
    index.add(ids[:3], vecs[:3])
    index.snapshot()
    with engine.begin() as c:  # the database's own cascade removes d0's chunks and vectors
        c.execute(text("DELETE FROM documents WHERE external_id = 'd0'"))

    fresh = CollectionIndex(tmp_path / "c", IndexSpec(dim=8))
    with session_scope(engine) as s:
        report = fresh.load(collection_vector_ids(s, coll_id), lambda want: fetch_vectors(s, want))
    assert (report.generation, report.added, report.removed) == (1, 6, 3)
    assert sorted(fresh.ids().tolist()) == sorted(ids[3:].tolist())
    np.testing.assert_array_equal(fresh.search(vecs[3:], 1)[1][:, 0], ids[3:])
