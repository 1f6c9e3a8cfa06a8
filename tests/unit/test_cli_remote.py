"""`--remote`: the CLI's embed, collections, index, search, rerank and answer commands against the in-process server
(tiny models, a thread draining indexing jobs in place of a Celery worker), through the SDK."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
from sieve.service.generation import Generators
from sieve.service.models import ModelPool
from typer.testing import CliRunner

from .test_refrag import text
from .test_service_generation import RecordingAnswerer, decoder, refrag, reranker  # noqa: F401 (fixtures)
from .test_service_server import Running, embedder, settings_for, store  # noqa: F401 (a fixture)

ADMIN = "cli-admin-key"


@pytest.fixture
def remote(tmp_path, monkeypatch, embedder, reranker, refrag):  # noqa: F811
    from sieve.workers import jobs
    from sieve.workers.pipeline import WorkerContext, drain

    running = Running(settings_for(tmp_path, admin_key=ADMIN, max_message_bytes=1024 * 1024),
                      models=ModelPool.preloaded({"tiny": embedder}, default="tiny"), engine=store(tmp_path),
                      generation=Generators.preloaded(reranker=reranker, answerer=RecordingAnswerer(refrag)))
    running.run(running.server.wait_ready(10))
    state = running.server.state
    ctx = WorkerContext(engine=state.engine, index_root=state.index_root, model_home=tmp_path, chunk_tokens=64,
                        chunk_overlap=0, device="cpu", dtype="float32", refrag_ks=(4,), embedders={"tiny": embedder},
                        block_encoder=refrag.blocks)
    lock = threading.Lock()

    def work(job_id: int) -> None:
        with lock:  # one worker
            drain(ctx, job_id)

    monkeypatch.setattr(jobs, "_default_enqueue", lambda job_id, n: threading.Thread(target=work, args=(job_id,),
                                                                                     daemon=True).start())
    monkeypatch.setenv("SIEVE_HOME", str(tmp_path / "client-home"))  # nothing local is used
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("SIEVE_API_KEY", ADMIN)
    monkeypatch.delenv("SIEVE_REMOTE", raising=False)
    yield running
    running.stop()


def sieve(*args, env=None):
    from sieve.cli import app

    return CliRunner().invoke(app, list(args), env=env)


def test_collections_index_search_and_drop_remotely(remote, tmp_path, reranker):  # noqa: F811
    t = remote.target
    out = sieve("collections", "create", "docs", "--remote", t)
    assert out.exit_code == 0, out.output
    assert "created collection 'docs' (tiny, 64-d, flat)" in out.stderr
    corpus = tmp_path / "corpus.jsonl"
    docs = [{"_id": f"d{i}", "title": f"title {i}", "text": text(8, i)} for i in range(6)]
    lines = [json.dumps(d) for d in docs]
    lines.insert(2, "{broken")
    corpus.write_text("\n".join(lines) + "\n")
    out = sieve("index", "docs", str(corpus), "--remote", t)
    assert out.exit_code == 0, out.output
    assert "submitted job(s)" in out.stderr and "6 documents indexed or unchanged, 1 failed" in out.stderr
    assert "corpus.jsonl:3" in out.stderr  # the broken line, found while reading here
    listed = json.loads(sieve("collections", "list", "--json", env={"SIEVE_REMOTE": t}).stdout)
    assert listed == [{"name": "docs", "embedder": "tiny", "dim": 64, "index": "flat", "documents": 6,
                       "pending": 0, "indexed": 6, "failed": 0, "chunks": listed[0]["chunks"]}]
    assert listed[0]["chunks"] >= 6

    out = sieve("search", "docs", docs[3]["text"], "-k", "3", "--json", "--remote", t)
    assert out.exit_code == 0, out.output
    hits = json.loads(out.stdout)
    with remote.client(api_key=ADMIN) as c:
        sdk = c.search("docs", docs[3]["text"], k=3)
    assert [(h["chunk_id"], h["external_id"]) for h in hits] == [(h.chunk_id, h.document_id) for h in sdk]
    assert set(hits[0]) == {"chunk_id", "external_id", "text", "score", "metadata", "ordinal"}
    out = sieve("search", "docs", docs[3]["text"], "-k", "2", "--rerank", "--json", "--remote", t)
    assert out.exit_code == 0, out.output
    reranked = json.loads(out.stdout)
    assert len(reranked) == 2 and all("vector_score" in h for h in reranked)
    table = sieve("search", "docs", "cell", "--remote", t)
    assert table.exit_code == 0 and "docs: cell" in table.stdout

    out = sieve("answer", "which gene?", "--collection", "docs", "--top-k", "2", "--max-new-tokens", "4",
                "--remote", t)
    assert out.exit_code == 0, out.output
    assert "passages d" in out.stderr and "2 precomputed" in out.stderr

    assert sieve("collections", "drop", "docs", "--yes", "--remote", t).exit_code == 0
    gone = sieve("search", "docs", "x", "--remote", t)
    assert gone.exit_code == 1 and "NOT_FOUND" in gone.output and "'docs'" in gone.output


def test_embed_rerank_and_answer_remotely(remote, embedder, reranker, refrag):  # noqa: F811
    from sieve.refrag import Answerer

    t = remote.target
    out = sieve("embed", "hello world", "short", "--dim", "16", "--remote", t)
    assert out.exit_code == 0, out.output
    got = json.loads(out.stdout)
    assert got["model"] == "tiny" and got["shape"] == [2, 16] and got["dtype"] == "float32"
    want = embedder.encode(["hello world", "short"], dim=16)
    np.testing.assert_allclose(np.array(got["vectors"]), want, atol=1e-4)

    passages = ["aspirin and the heart", "the eiffel tower", "heart attack risk"]
    out = sieve("rerank", "heart risk", *passages, "--json", "--remote", t)
    assert out.exit_code == 0, out.output
    ranked = json.loads(out.stdout)
    assert [r["index"] for r in ranked["ranking"]] == reranker.rank("heart risk", passages).order
    assert ranked["model"] == "tiny-rank" and ranked["mode"] == "full"

    out = sieve("answer", "which gene?", text(10, 1), text(12, 2), "--max-new-tokens", "6", "--remote", t)
    assert out.exit_code == 0, out.output
    want = "".join(Answerer(refrag).stream("which gene?", [text(10, 1), text(12, 2)], max_new_tokens=6))
    assert out.stdout == want + "\n" and "passages 0, 1" in out.stderr
    assert "tiny-refrag (k=4)" in out.stderr  # the model and block size that answered
    out = sieve("answer", "which gene?", text(10, 1), "--max-new-tokens", "2", "--k", "4", "--remote", t)
    assert out.exit_code == 0 and "tiny-refrag (k=4)" in out.stderr, out.output  # --k goes to the server
    out = sieve("answer", "which gene?", text(10, 1), "--k", "5", "--remote", t)
    assert out.exit_code == 1 and "block_size: 5: no REFRAG model" in out.output


def test_remote_errors_are_one_line_and_local_only_options_are_refused(remote, monkeypatch):
    t = remote.target
    monkeypatch.delenv("SIEVE_API_KEY")
    out = sieve("collections", "list", "--remote", t)
    assert out.exit_code == 1 and "UNAUTHENTICATED: missing API key" in out.output
    out = sieve("rerank", "q", "a", "--remote", t, "--api-key", "nope")
    assert out.exit_code == 1 and "invalid API key" in out.output
    out = sieve("answer", "q?", "--remote", t, "--api-key", ADMIN)
    assert out.exit_code == 1 and "collection: set a collection to retrieve from, or send passages" in out.output
    assert "needs --remote" in sieve("search", "docs", "q", "--rerank").output
    assert "needs --remote" in sieve("answer", "q?", "--collection", "docs").output
    out = sieve("index", "docs", "x.jsonl", "--inline", "--remote", t)
    assert out.exit_code == 1 and "--inline works only locally" in out.output
