"""The indexing pipeline without a broker: jobs, claims, chunking, idempotent batches, deletes, drops, search.

A tiny random-weight LLM embedder stands in for the real one; Celery is not involved (the tasks are thin wrappers
over `pipeline.drain`, exercised for real by the integration crash test).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from sieve.backbone import load_backbone
from sieve.embedder import Embedder, LLMEncoder
from sieve.store import Chunk, ChunkVector, Document, Job, JobBatch, make_engine, session_scope, upgrade
from sieve.store.collections import create_collection, get_collection
from sieve.store.errors import InvalidInput, NotFound
from sieve.store.index import IndexManager
from sieve.store.search import Searcher
from sieve.workers import jobs, sources
from sieve.workers.chunking import chunk_text, windows
from sieve.workers.jobs import DocumentIn
from sieve.workers.pipeline import WorkerContext, drain
from sqlalchemy import func, select, update

from .tiny_files import write_tiny_gguf

WORDS = ("alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
         "upsilon phi chi psi omega").split()


def doc_text(i: int, n: int = 40) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=n))


@pytest.fixture(scope="module")
def tiny_embedder(tmp_path_factory):
    path = tmp_path_factory.mktemp("emb") / "tiny.gguf"
    write_tiny_gguf(path)
    bb = load_backbone(path, home=tmp_path_factory.mktemp("home"), device="cpu", dtype="float32")
    return Embedder(LLMEncoder(bb, name="tiny", max_length=64), query_instruction="Query: ")


@pytest.fixture
def ctx(tmp_path, tiny_embedder):
    url = f"sqlite:///{tmp_path / 'sieve.db'}"
    upgrade(url)
    engine = make_engine(url)
    with session_scope(engine) as s:
        create_collection(s, "docs", embedder="tiny", dim=tiny_embedder.dim)
    c = WorkerContext(engine=engine, index_root=tmp_path / "indexes", model_home=tmp_path, chunk_tokens=24,
                      chunk_overlap=4, lease_s=60, embedders={"tiny": tiny_embedder})
    yield c
    engine.dispose()


class Sent:
    """An enqueue that records wake-ups instead of sending them."""

    def __init__(self):
        self.calls: list[tuple[int, int]] = []

    def __call__(self, job_id: int, n: int) -> None:
        self.calls.append((job_id, n))


def submit(ctx, docs, **kw):
    return jobs.submit_upsert(ctx.engine, "docs", docs, batch_documents=kw.pop("batch_documents", 3),
                              enqueue=kw.pop("enqueue", Sent()), **kw)


def state(ctx) -> tuple[int, int, list[int]]:
    """(SQL chunks, index ntotal, sorted index ids) for collection docs, as a fresh reader sees them."""
    with session_scope(ctx.engine) as s:
        chunks = s.scalar(select(func.count()).select_from(Chunk))
    index = Searcher(ctx.engine, ctx.index_root).index("docs")
    return chunks, index.ntotal, sorted(index.ids().tolist())


# -- chunking ----------------------------------------------------------------------------------------------------

def test_windows_cover_everything_with_the_overlap():
    assert windows(0, 8, 2) == []
    assert windows(5, 8, 2) == [(0, 5)]
    assert windows(20, 8, 2) == [(0, 8), (6, 14), (12, 20)]
    for n in range(1, 60):
        w = windows(n, 10, 3)
        assert w[0][0] == 0 and w[-1][1] == n
        assert all(b[0] == a[1] - 3 for a, b in zip(w, w[1:]))
    with pytest.raises(ValueError):
        windows(10, 4, 4)


def test_chunks_are_exact_slices_of_the_document(tiny_embedder):
    text = doc_text(1, 60)
    pieces = chunk_text(text, tiny_embedder.token_spans, size=16, overlap=4)
    assert len(pieces) > 2 and [p.ordinal for p in pieces] == list(range(len(pieces)))
    for p in pieces:
        assert p.text in text and p.token_end - p.token_start <= 16
    assert pieces[0].text.split()[0] == text.split()[0] and pieces[-1].text.split()[-1] == text.split()[-1]
    assert chunk_text("   \n ", tiny_embedder.token_spans, size=16, overlap=4) == []


# -- submit, drain, search ---------------------------------------------------------------------------------------

def test_upsert_indexes_every_document_and_search_finds_it(ctx, tiny_embedder):
    sent = Sent()
    docs = [DocumentIn(f"d{i}", doc_text(i), {"n": i, "even": i % 2 == 0}) for i in range(7)]
    job = submit(ctx, docs, enqueue=sent)
    assert job.status == "pending" and job.total == 7 and job.done == 0
    assert sent.calls == [(job.id, 3)]  # 3 batches of <= 3 documents, one wake-up each (fanout 8)
    assert drain(ctx, job.id) == 3
    info = jobs.get_job(ctx.engine, job.id)
    assert (info.status, info.done, info.failed, info.errors) == ("done", 7, 0, [])
    chunks, ntotal, ids = state(ctx)
    assert chunks == ntotal > 7 and len(set(ids)) == ntotal
    with session_scope(ctx.engine) as s:
        assert set(s.scalars(select(Document.status))) == {"indexed"}
        assert s.scalar(select(func.count()).select_from(ChunkVector)) == chunks
        first = s.scalar(select(Chunk).where(Chunk.ordinal == 0).join(Document).where(Document.external_id == "d4"))
        query_text = first.text
    searcher = Searcher(ctx.engine, ctx.index_root)
    vec = tiny_embedder.encode_documents([query_text])[0]
    hits = searcher.search("docs", vec, 3)
    assert hits[0].external_id == "d4" and hits[0].ordinal == 0 and hits[0].text == query_text
    assert hits[0].score == pytest.approx(1.0, abs=1e-4) and hits[0].metadata == {"n": 4, "even": True}
    odd = searcher.search("docs", vec, 5, filters={"even": False})
    assert odd and all(h.metadata["even"] is False for h in odd)
    with pytest.raises(InvalidInput, match="dimensions"):
        searcher.search("docs", np.ones(3, "float32"), 3)
    with pytest.raises(NotFound, match="nope"):
        searcher.search("nope", vec, 3)


def test_a_batch_processed_twice_changes_nothing(ctx):
    job = submit(ctx, [DocumentIn(f"d{i}", doc_text(i)) for i in range(3)])
    drain(ctx, job.id)
    before = state(ctx)
    with session_scope(ctx.engine) as s:  # as if the worker died after its work but before recording it
        s.execute(update(JobBatch).where(JobBatch.job_id == job.id, JobBatch.ordinal == 1)
                  .values(status="pending", owner=None, lease_until=None))
        s.execute(update(Job).where(Job.id == job.id).values(status="running"))
    ctx.writer.forget("docs")  # and a new process: nothing in memory
    assert drain(ctx, job.id) == 1
    assert state(ctx) == before
    info = jobs.get_job(ctx.engine, job.id)
    assert (info.status, info.done, info.total) == ("done", 3, 3)


def test_crash_between_sql_and_index_is_repaired_by_the_rerun(ctx, monkeypatch):
    job = submit(ctx, [DocumentIn(f"d{i}", doc_text(i)) for i in range(3)])

    def boom(*a, **k):
        raise ConnectionError("index writer went away")

    real = ctx.writer.apply
    monkeypatch.setattr(ctx.writer, "apply", boom)
    with pytest.raises(ConnectionError):
        drain(ctx, job.id)
    with session_scope(ctx.engine) as s:  # the claim was given back and SQL already holds the chunks
        batch = s.scalar(select(JobBatch).where(JobBatch.job_id == job.id, JobBatch.ordinal == 1))
        assert batch.status == "pending" and batch.owner is None
        assert s.scalar(select(func.count()).select_from(Chunk)) > 0
    monkeypatch.setattr(ctx.writer, "apply", real)
    drain(ctx, job.id)
    chunks, ntotal, ids = state(ctx)
    assert chunks == ntotal and jobs.get_job(ctx.engine, job.id).done == 3


def test_resubmitting_skips_unchanged_updates_metadata_and_replaces_changed(ctx):
    job = submit(ctx, [DocumentIn(f"d{i}", doc_text(i), {"v": 1}) for i in range(4)])
    drain(ctx, job.id)
    _, _, old_ids = state(ctx)
    with session_scope(ctx.engine) as s:
        d1_old = set(s.scalars(select(Chunk.id).join(Document).where(Document.external_id == "d1")))
    sent = Sent()
    again = submit(ctx, [DocumentIn("d0", doc_text(0), {"v": 1}), DocumentIn("d1", doc_text(101), {"v": 1}),
                         DocumentIn("d2", doc_text(2), {"v": 2}), DocumentIn("d3", doc_text(3), {"v": 1})],
                   enqueue=sent)
    assert again.done == 3 and again.total == 4 and len(sent.calls) == 1  # only d1 needs a worker
    drain(ctx, again.id)
    chunks, ntotal, ids = state(ctx)
    with session_scope(ctx.engine) as s:
        d1_new = set(s.scalars(select(Chunk.id).join(Document).where(Document.external_id == "d1")))
        assert s.scalar(select(Document.meta).where(Document.external_id == "d2")) == {"v": 2}
    assert d1_new and not d1_new & d1_old
    assert chunks == ntotal and set(ids) == (set(old_ids) - d1_old) | d1_new
    nothing = submit(ctx, [DocumentIn("d1", doc_text(101), {"v": 1})], enqueue=(sent := Sent()))
    assert nothing.status == "done" and nothing.done == 1 and sent.calls == []


def test_bad_documents_are_reported_and_the_rest_indexed(ctx):
    job = submit(ctx, [DocumentIn("ok", doc_text(1)), DocumentIn("empty", "  \n"), DocumentIn("dup", "first"),
                       DocumentIn("dup", doc_text(2))],
                 rejected=[{"file": "x.jsonl", "line": 7, "reason": "invalid JSON"}])
    drain(ctx, job.id)
    info = jobs.get_job(ctx.engine, job.id)
    assert (info.status, info.total, info.done, info.failed) == ("done", 5, 2, 3)
    reasons = {(e.get("external_id") or e.get("line")): e["reason"] for e in info.errors}
    assert "empty" in reasons["empty"] and "duplicate" in reasons["dup"] and reasons[7] == "invalid JSON"
    with session_scope(ctx.engine) as s:
        assert s.scalar(select(Document.text).where(Document.external_id == "dup")) == doc_text(2)
        assert s.scalar(select(func.count()).select_from(Document)) == 2
    with pytest.raises(NotFound, match="'ghost' does not exist"):
        jobs.submit_upsert(ctx.engine, "ghost", [DocumentIn("a", "b")], enqueue=Sent())
    with pytest.raises(InvalidInput, match="external_id"):
        submit(ctx, [DocumentIn("", "text")])


def test_a_document_the_model_refuses_fails_alone(ctx, monkeypatch):
    emb = ctx.embedders["tiny"]
    real = emb.encode_documents

    def picky(texts, **kw):
        if any("omega omega" in t for t in texts):
            raise ValueError("refused")
        return real(texts, **kw)

    monkeypatch.setattr(emb, "encode_documents", picky)
    job = submit(ctx, [DocumentIn("good", doc_text(5)), DocumentIn("bad", "omega omega omega")])
    drain(ctx, job.id)
    info = jobs.get_job(ctx.engine, job.id)
    assert (info.done, info.failed) == (1, 1) and "refused" in info.errors[0]["reason"]
    with session_scope(ctx.engine) as s:
        assert s.scalar(select(Document.status).where(Document.external_id == "bad")) == "failed"
    chunks, ntotal, _ = state(ctx)
    assert chunks == ntotal > 0


def test_a_smaller_collection_dim_is_a_matryoshka_cut_and_a_larger_one_fails_clearly(ctx, tiny_embedder):
    with session_scope(ctx.engine) as s:
        create_collection(s, "small", embedder="tiny", dim=16)
        create_collection(s, "big", embedder="tiny", dim=tiny_embedder.dim + 1)
    small = jobs.submit_upsert(ctx.engine, "small", [DocumentIn("a", doc_text(1))], enqueue=Sent())
    drain(ctx, small.id)
    assert jobs.get_job(ctx.engine, small.id).done == 1
    index = Searcher(ctx.engine, ctx.index_root).index("small")
    stored = index.reconstruct(index.ids())
    assert stored.shape[1] == 16 and np.allclose(np.linalg.norm(stored, axis=1), 1, atol=1e-5)
    big = jobs.submit_upsert(ctx.engine, "big", [DocumentIn("a", doc_text(1)), DocumentIn("b", doc_text(2))],
                             enqueue=Sent())
    assert drain(ctx, big.id) == 1  # settled at once, as failed: retrying cannot help
    info = jobs.get_job(ctx.engine, big.id)
    assert (info.status, info.failed) == ("failed", 2) and "holds" in info.errors[0]["reason"]


def test_workers_precompute_refrag_blocks_that_the_answer_path_can_read(ctx, tiny_embedder):
    import torch
    from sieve.refrag.encoder import BlockEncoder, EncodedPassage
    from sieve.store.blocks import fetch_blocks

    class Fixed:  # a stand-in chunk encoder: one 8-d vector per block, from the block's length
        name = "fixed-8"

        def embed(self, texts):
            return torch.stack([torch.full((8,), float(len(t))) for t in texts])

    tok = tiny_embedder.encoder.backbone.tokenizer
    ctx.refrag_ks, ctx.block_encoder = (4, 8), BlockEncoder(tok, Fixed())  # two block sizes, as SIEVE_REFRAG_BLOCKS=4,8
    drain(ctx, submit(ctx, [DocumentIn(f"d{i}", doc_text(i)) for i in range(3)]).id)
    with session_scope(ctx.engine) as s:
        chunks = {c.id: c.text for c in s.scalars(select(Chunk))}
        by_k = {k: fetch_blocks(s, list(chunks), k=k) for k in (4, 8)}
        assert fetch_blocks(s, list(chunks), k=16) == {}
    for k, records in by_k.items():
        assert set(records) == set(chunks)
        for cid, record in records.items():
            passage = EncodedPassage.from_record(record, chunks[cid], tok)
            assert passage.k == k and passage.n_blocks == -(-len(tok.encode(chunks[cid], add_bos=False)) // k)
            assert passage.vectors.shape == (passage.n_blocks, 8) and record["encoder"].startswith("fixed-8")
    jobs.submit_delete(ctx.engine, "docs", ["d0", "d1", "d2"], enqueue=Sent())
    drain(ctx, jobs.unfinished_jobs(ctx.engine)[0])
    with session_scope(ctx.engine) as s:  # they go with their chunks
        assert fetch_blocks(s, list(chunks), k=4) == {} and fetch_blocks(s, list(chunks), k=8) == {}


def test_warm_loads_and_runs_what_the_batches_will_need(ctx, tiny_embedder):
    from sieve.workers.pipeline import warm

    class Spy:  # counts what runs through each model
        def __init__(self, inner=None):
            self.inner, self.calls = inner, []

        def encode_documents(self, texts, **kw):
            self.calls.append(list(texts))
            return self.inner.encode_documents(texts, **kw)

        def encode_blocks(self, texts, k):
            self.calls.append((list(texts), k))
            return []

    with session_scope(ctx.engine) as s:
        create_collection(s, "more", embedder="tiny", dim=tiny_embedder.dim)  # two collections, one embedder
    spy = Spy(tiny_embedder)
    ctx.embedders = {"tiny": spy}
    assert warm(ctx, "other-default") == ["tiny"]  # the collections' embedder, not the default
    assert spy.calls == [["warm up"]]
    ctx.refrag_ks, ctx.block_encoder = (8, 16), Spy()
    warm(ctx, "other-default")
    assert ctx.block_encoder.calls == [(["warm up"], 8)]

    with session_scope(ctx.engine) as s:  # no collection yet: the default embedder
        for name in ("docs", "more"):
            s.delete(get_collection(s, name))
    loaded = []
    ctx.embedder = lambda name: loaded.append(name) or spy
    assert warm(ctx, "other-default") == ["other-default"] and loaded == ["other-default"]


def test_prefork_children_get_time_to_preload_and_a_context_of_their_own(tmp_path, monkeypatch):
    """With preload on, Celery waits PRELOAD_ALIVE_TIMEOUT_S (not its 4 s) for a prefork child to start, and a child
    forked from a parent that had built its context drops it (the engine without closing the parent's connections)
    before building its own."""
    from sieve.workers import tasks
    from sieve.workers.app import PRELOAD_ALIVE_TIMEOUT_S, make_app

    from sieve.settings import Settings

    assert make_app(Settings(home=tmp_path)).conf.worker_proc_alive_timeout == PRELOAD_ALIVE_TIMEOUT_S >= 60
    assert make_app(Settings(home=tmp_path, worker_preload=False)).conf.worker_proc_alive_timeout == 4.0

    class Engine:
        disposed = None

        def dispose(self, close=True):
            Engine.disposed = close

    class Inherited:
        engine = Engine()

    warmed = []
    monkeypatch.setenv("SIEVE_HOME", str(tmp_path))
    monkeypatch.setattr(tasks, "_ctx", Inherited())
    monkeypatch.setattr(tasks, "warm_up", lambda settings: warmed.append(settings) or "preloaded x in 0.0 s")
    tasks._on_child_start()  # in the worker's own process (the solo pool sends the signal there too): nothing
    assert isinstance(tasks._ctx, Inherited) and not warmed
    monkeypatch.setattr(tasks, "_MAIN_PID", -1)  # a forked child
    tasks._on_child_start()
    assert tasks._ctx is None and Engine.disposed is False and len(warmed) == 1
    monkeypatch.setenv("SIEVE_WORKER_PRELOAD", "0")
    tasks._on_child_start()
    assert len(warmed) == 1  # preload off: the child stays lazy


def test_delete_documents_leaves_index_and_sql_in_agreement(ctx):
    drain(ctx, submit(ctx, [DocumentIn(f"d{i}", doc_text(i)) for i in range(5)]).id)
    job = jobs.submit_delete(ctx.engine, "docs", ["d1", "d3", "missing"], enqueue=Sent())
    drain(ctx, job.id)
    info = jobs.get_job(ctx.engine, job.id)
    assert (info.status, info.total, info.done, info.failed) == ("done", 3, 2, 1)
    assert info.errors == [{"external_id": "missing", "reason": "not found in this collection"}]
    chunks, ntotal, ids = state(ctx)
    with session_scope(ctx.engine) as s:
        assert sorted(s.scalars(select(Document.external_id))) == ["d0", "d2", "d4"]
        assert sorted(s.scalars(select(Chunk.id))) == ids
    assert chunks == ntotal


def test_drop_collection_removes_rows_and_files(ctx):
    drain(ctx, submit(ctx, [DocumentIn("a", doc_text(1))]).id)
    folder = IndexManager(ctx.index_root).folder("docs")
    assert (folder / "manifest.json").is_file()
    jobs.drop_collection(ctx.engine, ctx.index_root, "docs")
    assert not folder.exists()
    with session_scope(ctx.engine) as s:
        for table in (Document, Chunk, ChunkVector, Job, JobBatch):
            assert s.scalar(select(func.count()).select_from(table)) == 0
        with pytest.raises(NotFound):
            get_collection(s, "docs")
    with pytest.raises(NotFound):
        jobs.drop_collection(ctx.engine, ctx.index_root, "docs")


# -- claims ------------------------------------------------------------------------------------------------------

def test_claims_are_exclusive_and_dead_or_expired_owners_lose_them(ctx):
    job = submit(ctx, [DocumentIn(f"d{i}", doc_text(i)) for i in range(6)], batch_documents=2)
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        host_alive = f"{os.uname().nodename}:{alive.pid}"
        a = jobs.claim_batch(ctx.engine, job.id, lease_s=60, owner=host_alive)
        b = jobs.claim_batch(ctx.engine, job.id, lease_s=60, owner="elsewhere:1")
        c = jobs.claim_batch(ctx.engine, job.id, lease_s=0.05, owner="elsewhere:2")
        assert len({a.batch_id, b.batch_id, c.batch_id}) == 3
        assert jobs.claim_batch(ctx.engine, job.id, lease_s=60, owner="elsewhere:3") is None  # all held
        time.sleep(0.1)  # c's lease runs out
        again = jobs.claim_batch(ctx.engine, job.id, lease_s=60, owner="elsewhere:3")
        assert again.batch_id == c.batch_id and again.attempts == 2
        assert jobs.stalled_jobs(ctx.engine) == []
        alive.kill()
        alive.wait()
        assert jobs.stalled_jobs(ctx.engine) == [job.id]  # a's owner died on this host
        assert jobs.claim_batch(ctx.engine, job.id, lease_s=60, owner="elsewhere:4").batch_id == a.batch_id
    finally:
        alive.kill()


def test_a_batch_that_keeps_killing_its_worker_is_given_up(ctx):
    job = submit(ctx, [DocumentIn("a", doc_text(1))])
    with session_scope(ctx.engine) as s:
        s.execute(update(JobBatch).where(JobBatch.job_id == job.id, JobBatch.ordinal == 1)
                  .values(attempts=jobs.MAX_ATTEMPTS))
    drain(ctx, job.id)
    info = jobs.get_job(ctx.engine, job.id)
    assert info.status == "failed" and "gave up" in info.errors[0]["reason"]


# -- sources -----------------------------------------------------------------------------------------------------

def test_jsonl_bad_lines_are_reported_with_their_numbers(tmp_path):
    f = tmp_path / "corpus.jsonl"
    f.write_text("\n".join([
        json.dumps({"_id": "1", "title": "T", "text": "body", "metadata": {"a": 1}}),
        "{not json",
        json.dumps(["a list"]),
        json.dumps({"text": "no id"}),
        "",
        json.dumps({"id": 5, "text": "plain"}),
    ]) + "\n")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.md").write_text("# A\n\nmarkdown")
    (tmp_path / "notes" / "skip.bin").write_text("x")
    items = list(sources.read_documents([tmp_path]))
    docs = [i for i in items if isinstance(i, DocumentIn)]
    bad = [i for i in items if isinstance(i, sources.Rejected)]
    assert [(d.external_id, d.text) for d in docs] == [("1", "T\n\nbody"), ("5", "plain"),
                                                        ("notes/a.md", "# A\n\nmarkdown")]
    assert docs[0].metadata == {"a": 1, "title": "T"}
    assert [b.line for b in bad] == [2, 3, 4] and "invalid JSON" in bad[0].reason and "id" in bad[2].reason
    with pytest.raises(FileNotFoundError):
        sources.expand([tmp_path / "missing"])
