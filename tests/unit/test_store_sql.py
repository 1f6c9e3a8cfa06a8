"""The SQL store on SQLite: migrations, constraints, cascades, chunk ids, stored vectors, settings."""

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sieve.store import migrate
from sieve.store.db import make_engine, session_scope
from sieve.store.models import (
    ApiKey,
    Base,
    Chunk,
    ChunkVector,
    Collection,
    Document,
    Job,
    chunk_id,
    content_hash,
    hash_api_key,
)
from sieve.store.vectors import collection_vector_ids, fetch_vectors, put_vectors
from sqlalchemy import inspect, select, text
from sqlalchemy.exc import IntegrityError

from sieve.settings import Settings

TABLES = {"collections", "documents", "chunks", "chunk_vectors", "jobs", "job_batches", "chunk_blocks", "api_keys"}


@pytest.fixture
def url(tmp_path):
    return f"sqlite:///{tmp_path / 'home' / 'sieve.db'}"  # the folder does not exist yet: make_engine creates it


@pytest.fixture
def engine(url):
    migrate.upgrade(url)
    engine = make_engine(url)
    yield engine
    engine.dispose()


def _doc(collection, external_id, body="some text", **kw):
    return Document(collection=collection, external_id=external_id, text=body, content_hash=content_hash(body), **kw)


def _chunks(collection: Collection, doc: Document, n: int) -> list[Chunk]:
    return [Chunk(id=chunk_id(collection.name, doc.external_id, doc.content_hash, i), document=doc, ordinal=i,
                  text=f"part {i}", token_start=10 * i, token_end=10 * i + 12) for i in range(n)]


# -- chunk ids ---------------------------------------------------------------------------------------------------


def test_chunk_id_is_stable_across_processes_and_versions():
    # golden values: a change here re-ids every chunk ever indexed, so it must be deliberate
    assert chunk_id("scifact", "doc-1", "ab" * 32, 0) == 6012576983380633710
    assert chunk_id("scifact", "doc-1", "ab" * 32, 1) == 3033730773927139945
    assert chunk_id("é", "x", "", 3) == 6849393576075200334


def test_chunk_id_depends_on_every_part_and_fits_signed_int64():
    base = ("c", "doc", "h", 0)
    variants = [base, ("c2", "doc", "h", 0), ("c", "doc2", "h", 0), ("c", "doc", "h2", 0), ("c", "doc", "h", 1),
                ("c,doc", "", "h", 0), ("c", "doc,h", "", 0)]  # no separator ambiguity
    ids = [chunk_id(*v) for v in variants]
    assert len(set(ids)) == len(ids)
    many = [chunk_id("coll", f"doc-{d}", content_hash(str(d)), o) for d in range(2000) for o in range(5)]
    assert len(set(many)) == len(many)
    assert all(0 <= i <= 2**63 - 1 for i in many)
    assert max(many) > 2**62  # uses the whole 63-bit range, not a truncated one
    assert np.array(many, dtype=np.int64).tolist() == many  # converts to int64 losslessly (FAISS ids)


def test_content_and_key_hashes():
    assert content_hash("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert content_hash("abc") != content_hash("abd")
    assert hash_api_key("sk-1") != hash_api_key("sk-2") and len(hash_api_key("sk-1")) == 64


# -- migrations --------------------------------------------------------------------------------------------------


def test_upgrade_creates_every_table_and_twice_is_a_no_op(url):
    assert migrate.current(url) is None
    migrate.upgrade(url)
    assert migrate.current(url) == migrate.head() == "0003"
    engine = make_engine(url)
    try:
        assert TABLES <= set(inspect(engine).get_table_names())
        with session_scope(engine) as s:
            s.add(Collection(name="kept", embedder="e", dim=4))
        migrate.upgrade(url)  # again: nothing to do, nothing lost
        assert migrate.current(url) == "0003"
        with engine.connect() as c:
            assert c.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
            assert c.execute(text("SELECT name FROM collections")).scalars().all() == ["kept"]
    finally:
        engine.dispose()


def test_migrations_match_the_models(engine):
    with engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_downgrade_to_base_drops_the_tables(url):
    migrate.upgrade(url)
    migrate.downgrade(url, "base")
    engine = make_engine(url)
    try:
        assert not TABLES & set(inspect(engine).get_table_names())
        assert migrate.current(url) is None
    finally:
        engine.dispose()


def test_sqlite_engine_uses_wal_and_foreign_keys(engine):
    with engine.connect() as c:
        assert c.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


# -- constraints and cascades ------------------------------------------------------------------------------------


def test_external_id_is_unique_per_collection_only(engine):
    with session_scope(engine) as s:
        a, b = Collection(name="a", embedder="e", dim=4), Collection(name="b", embedder="e", dim=4)
        s.add_all([_doc(a, "x"), _doc(b, "x")])  # same external id, different collections: fine
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(_doc(s.scalar(select(Collection).where(Collection.name == "a")), "x"))
    with session_scope(engine) as s:  # the failed transaction rolled back and left the rest intact
        assert s.scalar(select(text("count(*)")).select_from(Document)) == 2


def test_collection_name_is_unique(engine):
    with session_scope(engine) as s:
        s.add(Collection(name="a", embedder="e", dim=4))
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(Collection(name="a", embedder="other", dim=8))


@pytest.mark.parametrize("bad", [
    lambda: Collection(name="m", embedder="e", dim=4, metric="cosine"),
    lambda: Collection(name="k", embedder="e", dim=4, index_kind="lsh"),
    lambda: Collection(name="d", embedder="e", dim=0),
    lambda: _doc(Collection(name="s", embedder="e", dim=4), "x", status="done"),
    lambda: Job(kind="upsert", status="lost"),
])
def test_check_constraints_reject_unknown_values(engine, bad):
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        s.add(bad())


def test_defaults_and_json_round_trip(engine):
    with session_scope(engine) as s:
        coll = Collection(name="c", embedder="all-minilm-l6-v2", dim=384)
        doc = _doc(coll, "d1", meta={"title": "Tíťle", "tags": ["a", "b"], "year": 2024})
        job = Job(collection=None, kind="upsert", total=3, errors=[{"line": 7, "reason": "malformed json"}])
        key = ApiKey(key_hash=hash_api_key("sk-secret"), name="app", scopes=["search:c"])
        s.add_all([doc, job, key])
    with session_scope(engine) as s:
        coll = s.scalar(select(Collection))
        assert (coll.metric, coll.index_kind, coll.created_at is not None) == ("ip", "flat", True)
        doc = s.scalar(select(Document))
        assert doc.status == "pending" and doc.error is None
        assert doc.meta == {"title": "Tíťle", "tags": ["a", "b"], "year": 2024}
        job = s.scalar(select(Job))
        assert (job.status, job.done, job.failed, job.finished_at) == ("pending", 0, 0, None)
        assert job.errors == [{"line": 7, "reason": "malformed json"}]
        key = s.scalar(select(ApiKey).where(ApiKey.key_hash == hash_api_key("sk-secret")))
        assert key.scopes == ["search:c"] and not key.revoked


def test_deleting_a_collection_cascades_to_documents_chunks_vectors_jobs(engine):
    with session_scope(engine) as s:
        coll = Collection(name="c", embedder="e", dim=4)
        doc = _doc(coll, "d")
        chunks = _chunks(coll, doc, 3)
        s.add_all([doc, Job(collection=coll, kind="upsert")])
        s.flush()
        put_vectors(s, [c.id for c in chunks], np.ones((3, 4)))
    with engine.begin() as c:  # plain SQL, so the database's ON DELETE CASCADE is what is tested, not the ORM's
        c.execute(text("DELETE FROM collections WHERE name = 'c'"))
    with engine.connect() as c:
        for table in ("documents", "chunks", "chunk_vectors", "jobs"):
            assert c.execute(text(f"SELECT count(*) FROM {table}")).scalar() == 0, table


def test_chunk_ids_use_the_whole_bigint_range(engine):
    big = 2**63 - 1
    with session_scope(engine) as s:
        doc = _doc(Collection(name="c", embedder="e", dim=4), "d")
        s.add(Chunk(id=big, document=doc, ordinal=0, text="t", token_start=0, token_end=1))
    with session_scope(engine) as s:
        assert s.scalar(select(Chunk.id)) == big


def test_same_ordinal_twice_in_a_document_is_rejected(engine):
    with pytest.raises(IntegrityError), session_scope(engine) as s:
        doc = _doc(Collection(name="c", embedder="e", dim=4), "d")
        s.add_all([Chunk(id=1, document=doc, ordinal=0, text="a", token_start=0, token_end=1),
                   Chunk(id=2, document=doc, ordinal=0, text="b", token_start=1, token_end=2)])


# -- stored vectors ----------------------------------------------------------------------------------------------


def test_vectors_round_trip_in_order_and_are_scoped_to_their_collection(engine):
    rng = np.random.default_rng(0)
    with session_scope(engine) as s:
        a, b = Collection(name="a", embedder="e", dim=8), Collection(name="b", embedder="e", dim=8)
        da, db = _doc(a, "x"), _doc(b, "x")
        ca, cb = _chunks(a, da, 5), _chunks(b, db, 2)
        s.add_all([da, db])
        s.flush()
        va = rng.standard_normal((5, 8)).astype("float32")
        put_vectors(s, [c.id for c in ca], va)
        put_vectors(s, [c.id for c in cb], rng.standard_normal((2, 8)))
        a_id = a.id
    with session_scope(engine) as s:
        ids = collection_vector_ids(s, a_id)
        assert sorted(ids.tolist()) == ids.tolist() == sorted(c.id for c in ca)
        order = [ca[3].id, ca[0].id, ca[4].id]
        np.testing.assert_array_equal(fetch_vectors(s, order), va[[3, 0, 4]])
        with pytest.raises(KeyError, match="no stored vector"):
            fetch_vectors(s, [ca[0].id, 12345])
        put_vectors(s, [ca[0].id], np.full((1, 8), 7.0))  # replace, not duplicate
    with session_scope(engine) as s:
        np.testing.assert_array_equal(fetch_vectors(s, [ca[0].id])[0], np.full(8, 7.0, "float32"))
        assert s.scalar(select(text("count(*)")).select_from(ChunkVector)) == 7


def test_session_scope_rolls_back_on_error(engine):
    with pytest.raises(RuntimeError, match="boom"), session_scope(engine) as s:
        s.add(Collection(name="never", embedder="e", dim=4))
        s.flush()
        raise RuntimeError("boom")
    with session_scope(engine) as s:
        assert s.scalar(select(Collection)) is None


# -- settings ----------------------------------------------------------------------------------------------------


def test_settings_default_to_sqlite_and_indexes_under_home(tmp_path, monkeypatch):
    monkeypatch.delenv("SIEVE_DATABASE_URL", raising=False)
    monkeypatch.delenv("SIEVE_INDEX_DIR", raising=False)
    s = Settings(home=tmp_path)
    assert s.resolved_database_url() == f"sqlite:///{tmp_path / 'sieve.db'}"
    assert s.index_path() == tmp_path / "indexes"
    monkeypatch.setenv("SIEVE_DATABASE_URL", "postgresql+psycopg://u@h:5432/sieve")
    monkeypatch.setenv("SIEVE_INDEX_DIR", str(tmp_path / "elsewhere"))
    s = Settings(home=tmp_path)
    assert s.resolved_database_url() == "postgresql+psycopg://u@h:5432/sieve"
    assert s.index_path() == tmp_path / "elsewhere"


def test_default_settings_url_migrates(tmp_path):
    url = Settings(home=tmp_path / "fresh").resolved_database_url()
    migrate.upgrade(url)
    assert (tmp_path / "fresh" / "sieve.db").is_file() and migrate.current(url) == migrate.head()
