"""Crash test: a real `sieve worker` process indexes 2,000 SciFact documents and is killed with SIGKILL at random
moments (at least 5 times, at least once while a batch is in flight), then restarted; at the end every document is
indexed exactly once and search agrees with an index built without crashes. Run on the embedded default (SQLite +
Celery's SQLAlchemy broker) and on PostgreSQL + Redis (the local servers).

Bounded for CI: the abstracts are cut to their first 300 characters and chunked into 48-token windows (~2 chunks
a document, ~4,000 in all), so one pass embeds ~145k tokens with all-MiniLM-L6-v2 (it was 600 characters and
96-token windows, the same number of chunks at twice the tokens, until the suite outgrew CI's time).
"""

from __future__ import annotations

import gzip
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sieve.store import Chunk, Document, make_engine, session_scope, upgrade
from sieve.store.index import CollectionIndex, IndexSpec
from sieve.store.models import chunk_id, content_hash
from sieve.store.search import Searcher
from sieve.workers import jobs
from sieve.workers.chunking import chunk_text
from sqlalchemy import func, select

from sieve.settings import Settings

pytestmark = pytest.mark.integration

N_DOCS = 2000
N_KILLS = 5
CHUNK_TOKENS, CHUNK_OVERLAP, TEXT_CHARS = 48, 8, 300
COLLECTION = "crash"
MODEL = "all-minilm-l6-v2"
REDIS = os.environ.get("SIEVE_TEST_REDIS", "redis://127.0.0.1:6379/11")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    src = Settings().data_path() / "retrieval" / "scifact" / "corpus.jsonl.gz"
    if not src.is_file():
        pytest.skip(f"no SciFact corpus at {src}")
    out = tmp_path_factory.mktemp("corpus") / "scifact-2000.jsonl"
    with gzip.open(src, "rt") as f, open(out, "w") as g:
        for _, line in zip(range(N_DOCS), f):
            doc = json.loads(line)
            g.write(json.dumps({"_id": doc["_id"], "title": doc["title"], "text": doc["text"][:TEXT_CHARS]}) + "\n")
    return out


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """What an index built without crashes holds: every chunk id, its vector (embedded here, in-process, without
    the pipeline), and the exact top-10 of some queries by brute force."""
    from sieve.embedder import load_embedder
    from sieve.workers.sources import read_documents

    from sieve.registry import resolve_embedder

    emb = load_embedder(resolve_embedder(MODEL), home=tmp_path_factory.mktemp("models"), device="cpu")
    size = min(CHUNK_TOKENS, emb.max_length - 8)
    ids, texts = [], []
    for doc in read_documents([corpus]):
        for piece in chunk_text(doc.text, emb.token_spans, size=size, overlap=CHUNK_OVERLAP):
            ids.append(chunk_id(COLLECTION, doc.external_id, content_hash(doc.text), piece.ordinal))
            texts.append(piece.text)
    vectors = emb.encode_documents(texts)
    queries = [json.loads(line)["text"] for line in
               open(Settings().data_path() / "retrieval" / "scifact" / "queries.jsonl")][:20]
    qv = emb.encode_queries(queries)
    top = np.argsort(-(qv @ vectors.T), axis=1)[:, :10]
    return {"ids": np.asarray(ids, dtype="int64"), "vectors": vectors, "queries": qv,
            "top": np.asarray(ids, dtype="int64")[top], "vector_of": dict(zip(ids, vectors))}


def _env(home: Path, database_url: str | None, broker_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIEVE_")}
    env.update(SIEVE_HOME=str(home), SIEVE_THREADS="2", SIEVE_DEVICE="cpu", SIEVE_CHUNK_TOKENS=str(CHUNK_TOKENS),
               SIEVE_CHUNK_OVERLAP=str(CHUNK_OVERLAP), SIEVE_BATCH_DOCUMENTS="50", SIEVE_JOB_LEASE_S="20",
               SIEVE_WORKER_FANOUT="1",  # one message per job: the first kill loses it, the sweep must recover
               SIEVE_REFRAG_BLOCKS="0",  # embedding only (block encodings are tested in unit/test_workers.py)
               SIEVE_LOG_LEVEL="WARNING")
    if database_url:
        env["SIEVE_DATABASE_URL"] = database_url
    if broker_url:
        env["SIEVE_BROKER_URL"] = broker_url
    return env


def _sieve(*args: str, env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sieve.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300, **kw)


def _settled(engine, job_id: int) -> int:
    info = jobs.get_job(engine, job_id)
    return info.done + info.failed


def _in_flight(engine, job_id: int) -> bool:
    """True while some batch of the job is claimed (a worker is inside it)."""
    from sieve.store.models import JobBatch

    with session_scope(engine) as s:
        return bool(s.scalar(select(func.count()).select_from(JobBatch).where(
            JobBatch.job_id == job_id, JobBatch.status == "pending", JobBatch.owner.is_not(None))))


def run_crash_test(tmp_path: Path, corpus: Path, reference, database_url: str | None, broker_url: str | None):
    home = tmp_path / "home"
    env = _env(home, database_url, broker_url)
    settings = Settings(home=home, database_url=database_url)
    url = settings.resolved_database_url()
    home.mkdir()
    upgrade(url)
    engine = make_engine(url)
    created = _sieve("collections", "create", COLLECTION, "--embedder", MODEL, env=env)
    assert created.returncode == 0, created.stderr
    submitted = _sieve("index", COLLECTION, str(corpus), "--no-wait", env=env)
    assert submitted.returncode == 0, submitted.stderr
    (job_id,) = json.loads(submitted.stdout)["jobs"]

    rng = random.Random(1234)
    log = open(tmp_path / "worker.log", "w")
    kills, mid_batch = [], 0
    worker = None

    def start():
        return subprocess.Popen([sys.executable, "-m", "sieve.cli", "worker"], env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)

    try:
        for _ in range(N_KILLS):
            before = _settled(engine, job_id)
            worker = start()
            deadline = time.monotonic() + 120
            while _settled(engine, job_id) == before and time.monotonic() < deadline:  # let it make progress
                time.sleep(0.2)
            time.sleep(rng.uniform(0.0, 3.0))  # then a random moment
            mid_batch += _in_flight(engine, job_id)
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
            kills.append(_settled(engine, job_id))
            assert not jobs.get_job(engine, job_id).finished, f"job finished before kill {len(kills)}: {kills}"
        worker = start()
        deadline = time.monotonic() + 900
        while not jobs.get_job(engine, job_id).finished:
            assert time.monotonic() < deadline, f"job not finished; settled after each kill: {kills}"
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGKILL)
        log.close()

    assert len(kills) == N_KILLS and mid_batch >= 1, (kills, mid_batch)
    # every worker loaded the collection's embedder before saying ready, not inside its first batch
    assert (tmp_path / "worker.log").read_text().count(f"preloaded {MODEL}") == N_KILLS + 1
    info = jobs.get_job(engine, job_id)
    assert (info.status, info.total, info.done, info.failed) == ("done", N_DOCS, N_DOCS, 0), info.errors[:5]

    with session_scope(engine) as s:
        sql_ids = np.fromiter(s.scalars(select(Chunk.id)), dtype="int64")
        assert s.scalar(select(func.count()).select_from(Document).where(Document.status == "indexed")) == N_DOCS
    assert len(sql_ids) == len(reference["ids"]) and set(sql_ids.tolist()) == set(reference["ids"].tolist())

    # the snapshot on disk, read as it is (no reconciling with SQL): exactly the chunks, once each
    disk = CollectionIndex(settings.index_path() / COLLECTION, IndexSpec(dim=384))
    disk.load()
    on_disk = disk.ids()
    assert disk.ntotal == len(sql_ids) == len(np.unique(on_disk))
    assert set(on_disk.tolist()) == set(sql_ids.tolist())

    # search through the service's path agrees with the crash-free reference (ties within 1e-4 may swap)
    searcher = Searcher(engine, settings.index_path())
    for q, want in zip(reference["queries"], reference["top"]):
        got = [h.chunk_id for h in searcher.search(COLLECTION, q, 10)]
        ref_scores = {int(i): float(q @ reference["vector_of"][int(i)]) for i in want}
        for rank, (g, w) in enumerate(zip(got, want)):
            if g != w:
                assert g in reference["vector_of"], f"rank {rank}: unknown chunk {g}"
                assert abs(float(q @ reference["vector_of"][g]) - ref_scores[int(w)]) < 1e-4, (rank, got, want)
    engine.dispose()
    return kills


def test_crash_test_embedded_default(tmp_path, corpus, reference):
    kills = run_crash_test(tmp_path, corpus, reference, database_url=None, broker_url=None)
    print(f"embedded: documents settled at each kill: {kills}")


def test_crash_test_postgres_and_redis(tmp_path, corpus, reference, pg_url):
    redis = pytest.importorskip("redis")
    try:
        client = redis.Redis.from_url(REDIS, socket_connect_timeout=3)
        client.flushdb()
    except redis.exceptions.ConnectionError as e:
        pytest.skip(f"no Redis at {REDIS}: {e}")
    kills = run_crash_test(tmp_path, corpus, reference, database_url=pg_url, broker_url=REDIS)
    print(f"postgres+redis: documents settled at each kill: {kills}")
