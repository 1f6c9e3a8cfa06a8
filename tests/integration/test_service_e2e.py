"""The real server process (`python -m sieve.service`, all-MiniLM-L6-v2, SQLite store, SmolLM2 reranker and REFRAG
model preloaded) on free ports, through the SDK, sync and async: every RPC (Rerank, Search(rerank) and the streamed
Answer included), reflection as grpcurl uses it, health flipping to SERVING, the bad-input table, 200 concurrent
callers against a small queue, a remote CLI command, and a graceful exit on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import grpc
import numpy as np
import pytest
from sieve_client import (
    AsyncSieveClient,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RetryPolicy,
    SieveClient,
    Unauthenticated,
    Unimplemented,
)
from sieve_client._proto import embed_pb2, embed_pb2_grpc

pytestmark = pytest.mark.integration
ADMIN = "it-admin-key"
NO_RETRY = RetryPolicy(attempts=1)
TEXTS = ["The cat sat on the mat.", "Quantum chromodynamics describes the strong force.", "A dog barked."]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_available() -> bool:
    from sieve.cli_service import _worker_available

    return _worker_available()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("sieve-home")
    port, metrics_port = free_port(), free_port()
    env = dict(os.environ, SIEVE_HOME=str(home), SIEVE_EMBEDDER="all-minilm-l6-v2", SIEVE_THREADS="1",
               SIEVE_ADMIN_KEY=ADMIN, SIEVE_MAX_QUEUED_TEXTS="64", SIEVE_MAX_TEXTS_PER_REQUEST="64",
               SIEVE_MAX_MESSAGE_BYTES=str(256 * 1024), SIEVE_AUTH_CACHE_S="0", SIEVE_LOG_LEVEL="WARNING",
               SIEVE_PRELOAD_MODELS="1",
               # the worker's REFRAG block encoder hands the device setting to sentence-transformers as it is, and
               # "auto" is not a torch device (workers/pipeline.py WorkerContext.blocks): name the device
               SIEVE_DEVICE="cpu")
    with_worker = worker_available()
    cmd = [sys.executable, "-m", "sieve.service", "--port", str(port), "--metrics-port", str(metrics_port)]
    if not with_worker:
        cmd.append("--no-worker")
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    target = f"127.0.0.1:{port}"
    seen: list[str] = []
    client = SieveClient(target, api_key=ADMIN, retry=NO_RETRY)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert proc.poll() is None, (home / "server.log").read_text()
        try:
            status = client.health(timeout=1)
        except Exception:
            status = "DOWN"
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == "SERVING":
            break
        time.sleep(0.05)
    client.close()
    yield {"target": target, "metrics": metrics_port, "proc": proc, "health_seen": seen, "home": home,
           "worker": with_worker}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, (home / "server.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def minilm():
    import torch
    from sieve.embedder import load_embedder

    from sieve.registry import resolve_embedder

    torch.set_num_threads(1)
    return load_embedder(resolve_embedder("all-minilm-l6-v2"), home="/tmp", device="cpu", dtype="float32")


def test_health_flips_to_serving(served):
    seen = [s for s in served["health_seen"] if s != "DOWN"]
    assert seen[-1] == "SERVING"
    assert "NOT_SERVING" in seen, seen  # the port was up before the model was loaded


def test_reflection_lists_and_describes_the_services(served):
    from google.protobuf import descriptor_pb2
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(served["target"]) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        requests = [reflection_pb2.ServerReflectionRequest(list_services=""),
                    reflection_pb2.ServerReflectionRequest(file_containing_symbol="sieve.v1.EmbedService")]
        listed, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listed.list_services_response.service}
    assert {"sieve.v1.InfoService", "sieve.v1.EmbedService", "sieve.v1.CollectionService",
            "sieve.v1.DocumentService", "sieve.v1.SearchService", "grpc.health.v1.Health"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(b)
             for b in described.file_descriptor_response.file_descriptor_proto]
    embed = next(f for f in files if f.name == "sieve/v1/embed.proto")
    assert [m.name for m in embed.service[0].method] == ["Embed", "EmbedStream", "Tokenize"]


def test_every_rpc_through_the_sync_sdk(served, minilm):
    with SieveClient(served["target"], api_key=ADMIN) as c:
        info = c.info()
        assert info.default_model == "all-minilm-l6-v2" and info.auth_enabled
        assert next(m for m in info.models if m.name == "all-minilm-l6-v2").dim == 384
        got = c.embed(TEXTS)
        np.testing.assert_allclose(got.to_numpy(), minilm.encode(TEXTS), atol=1e-4)
        assert c.embed(TEXTS, dim=128, precision="binary").to_numpy().shape == (3, 16)
        streamed = list(c.embed_stream([TEXTS[:1], TEXTS[1:]]))
        np.testing.assert_allclose(np.vstack([r.to_numpy() for r in streamed]), got.to_numpy(), atol=1e-5)
        toks = c.tokenize(["hello world"])
        assert toks[0].pieces[:1] == ["[CLS]"] and toks[0].ids[-1] == 102

        made = c.create_collection("docs")
        assert (made.dim, made.embedder) == (384, "all-minilm-l6-v2")
        assert "docs" in [x.name for x in c.list_collections()]
        job = c.upsert("docs", [("a", "Cats are small domestic felines.", {"kind": "animal"}),
                                ("b", "The strong force binds quarks together.", {"kind": "physics"})])
        assert job.kind == "upsert" and job.collection == "docs" and job.total >= 2
        assert c.get_job(job.id).id == job.id
        if served["worker"]:
            final = c.wait_job(job.id, timeout=180)
            assert final.status == "done", final
            assert c.get_collection("docs").chunks >= 2
            try:
                hits = c.search("docs", "what binds quarks?", k=2)
            except Unimplemented:
                pytest.skip("sieve.store.search is not there yet")
            assert hits[0].document_id == "b" and hits[0].metadata["kind"] == "physics"
            assert [h.document_id for h in c.search("docs", "quarks", k=2, filters={"kind": "animal"})] == ["a"]
            deleted = c.wait_job(c.delete_documents("docs", ["a"]).id, timeout=120)
            assert deleted.status == "done"
        else:
            first = next(iter(c.watch_job(job.id, timeout=5)))
            assert first.id == job.id and first.status in ("pending", "running")
        c.delete_collection("docs")
        with pytest.raises(NotFound):
            c.get_collection("docs")


def test_every_rpc_through_the_async_sdk(served, minilm):
    async def go():
        async with AsyncSieveClient(served["target"], api_key=ADMIN) as c:
            assert (await c.info()).auth_enabled
            got = await c.embed(TEXTS, query=True)
            np.testing.assert_allclose(got.to_numpy(), minilm.encode_queries(TEXTS), atol=1e-4)
            streamed = [r async for r in c.embed_stream([TEXTS[:2], TEXTS[2:]])]
            assert [len(r) for r in streamed] == [2, 1]
            assert (await c.tokenize(["hi"]))[0].ids[0] == 101
            await c.create_collection("adocs", metric="ip")
            assert (await c.get_collection("adocs")).dim == 384
            job = await c.upsert("adocs", [{"id": "x", "text": "hello there"}])
            assert (await c.get_job(job.id)).collection == "adocs"
            if served["worker"]:
                final = await c.wait_job(job.id, timeout=180)
                assert final.id == job.id and final.status == "done", final.errors
            else:
                updates = c.watch_job(job.id, timeout=3)
                first = await updates.__anext__()
                await updates.aclose()
                assert first.id == job.id and first.status in ("pending", "running")
            assert "adocs" in [x.name for x in await c.list_collections()]
            job2 = await c.delete_documents("adocs", ["x"])
            assert job2.kind == "delete"
            await c.delete_collection("adocs")

    asyncio.run(go())


PASSAGES = ["The Eiffel Tower is a landmark in Paris.", "Aspirin lowers the risk of heart attacks.",
            "Gluons bind quarks together through the strong force."]


def test_rerank_search_rerank_and_answer_through_the_real_server(served):
    """SmolLM2 through the real path: Rerank, Search(rerank=true) over indexed chunks, Answer from sent passages
    and from a collection (block encodings precomputed by the worker), sync and async, and `sieve search --remote`."""
    with SieveClient(served["target"], api_key=ADMIN, timeout=300) as c:
        for service in ("sieve.v1.RerankService", "sieve.v1.AnswerService"):
            c.wait_until_serving(timeout=300, service=service)  # preloaded (SIEVE_PRELOAD_MODELS)
        info = c.info()
        assert (info.reranker.name, info.reranker.loaded, info.answerer.name) == ("sieve-rank", True, "refrag-k16")
        ranked = c.rerank("What lowers the risk of a heart attack?", PASSAGES, return_text=True)
        assert sorted(ranked.order) == [0, 1, 2] and (ranked.model, ranked.mode) == ("sieve-rank", "full")
        assert [r.score for r in ranked] == [3.0, 2.0, 1.0] and ranked[0].text == PASSAGES[ranked.order[0]]
        first = c.rerank("What lowers the risk of a heart attack?", PASSAGES, mode="first", top_k=1)
        assert len(first) == 1 and first.mode == "first" and first.tokens > 0

        stream = c.answer("What binds quarks together?", passages=PASSAGES, max_new_tokens=8)
        answer = stream.read()
        assert answer.strip() and [x.index for x in stream.citations] == [0, 1, 2]
        assert stream.finish_reason in ("eos", "max_new_tokens") and 0 < stream.usage.generated_tokens <= 8
        assert stream.usage.prompt_positions < stream.usage.full_prompt_tokens  # the passages went in compressed
        assert (stream.usage.model, stream.usage.block_size) == ("refrag-k16", 16)
        assert [(a.name, a.block_size) for a in info.answerers] == [
            ("refrag-k16", 16), ("refrag-k8", 8), ("refrag-k32", 32)]  # the default SIEVE_REFRAG_BLOCK_MODELS
        k32 = c.answer("What binds quarks together?", passages=PASSAGES, max_new_tokens=4, block_size=32)
        assert k32.read().strip() and (k32.usage.model, k32.usage.block_size) == ("refrag-k32", 32)
        assert k32.usage.blocks <= stream.usage.blocks and c.info().answerers[2].loaded  # loaded by that call
        with pytest.raises(InvalidArgument, match=r"passages\[1\]: empty"):
            list(c.answer("q?", passages=["a", " "]))

        if served["worker"]:
            c.create_collection("rag")
            job = c.upsert("rag", [(f"p{i}", p) for i, p in enumerate(PASSAGES)])
            final = c.wait_job(job.id, timeout=240)
            assert final.status == "done", final.errors
            plain = c.search("rag", "What binds quarks together?", k=3)
            hits = c.search("rag", "What binds quarks together?", k=2, rerank=True)  # reranks all 3 candidates
            assert len(hits) == 2 and {h.chunk_id for h in hits} <= {h.chunk_id for h in plain}
            assert [h.score for h in hits] == [3.0, 2.0]
            by_id = {h.chunk_id: h.score for h in plain}
            assert all(h.vector_score == pytest.approx(by_id[h.chunk_id], abs=1e-5) for h in hits)
            rag = c.answer("What binds quarks together?", collection="rag", k=2, max_new_tokens=8)
            assert rag.read().strip()
            assert [x.chunk_id for x in rag.citations] == [h.chunk_id for h in plain[:2]]
            assert rag.usage.precomputed_passages == 2  # the worker's block encodings, not re-encoded

            cli = subprocess.run([sys.executable, "-m", "sieve.cli", "search", "rag", "What binds quarks together?",
                                  "-k", "2", "--json", "--remote", served["target"]], capture_output=True, text=True,
                                 env={**os.environ, "SIEVE_API_KEY": ADMIN}, timeout=120)
            assert cli.returncode == 0, cli.stderr
            assert [h["chunk_id"] for h in json.loads(cli.stdout)] == [h.chunk_id for h in plain[:2]]
            c.delete_collection("rag")
        else:
            cli = subprocess.run([sys.executable, "-m", "sieve.cli", "rerank", "heart attack", *PASSAGES, "--json",
                                  "--remote", served["target"]], capture_output=True, text=True,
                                 env={**os.environ, "SIEVE_API_KEY": ADMIN}, timeout=120)
            assert cli.returncode == 0, cli.stderr
            assert sorted(r["index"] for r in json.loads(cli.stdout)["ranking"]) == [0, 1, 2]

    async def go():
        async with AsyncSieveClient(served["target"], api_key=ADMIN, timeout=300) as a:
            r = await a.rerank("quarks", PASSAGES, mode="sliding")
            s = a.answer("Where is the Eiffel Tower?", passages=PASSAGES[:1], max_new_tokens=6)
            pieces = [p async for p in s]
            return r, pieces, s

    r, pieces, s = asyncio.run(go())
    assert sorted(r.order) == [0, 1, 2] and r.mode == "sliding"
    assert pieces and "".join(pieces) == s.text and s.citations[0].index == 0


def test_bad_input_table(served):
    from sieve.service.auth import create_key
    from sieve.store import make_engine

    engine = make_engine(f"sqlite:///{served['home'] / 'sieve.db'}")
    _, embed_only = create_key(engine, "embed only", ["embed"])
    engine.dispose()
    t = served["target"]
    admin = SieveClient(t, api_key=ADMIN, retry=NO_RETRY)
    admin.create_collection("guarded")

    def raw(request, **kw):
        with grpc.insecure_channel(t) as ch:
            return embed_pb2_grpc.EmbedServiceStub(ch).Embed(request, metadata=(("x-api-key", ADMIN),), **kw)

    cases = [  # (name, call, expected status, words in the message)
        ("empty texts", lambda: admin.embed([]), "INVALID_ARGUMENT", "texts: empty"),
        ("too many texts", lambda: raw(embed_pb2.EmbedRequest(texts=["a"] * 65)), "INVALID_ARGUMENT", "texts: 65"),
        ("over the limit, no truncation", lambda: admin.embed(["ok", "word " * 600], truncate=False),
         "INVALID_ARGUMENT", "texts[1]"),
        ("unknown pooling", lambda: raw(embed_pb2.EmbedRequest(texts=["a"], options=embed_pb2.EmbedOptions(
            pooling=42))), "INVALID_ARGUMENT", "options.pooling"),
        ("unknown precision", lambda: raw(embed_pb2.EmbedRequest(texts=["a"], options=embed_pb2.EmbedOptions(
            precision=42))), "INVALID_ARGUMENT", "options.precision"),
        ("dim out of range", lambda: admin.embed(["a"], dim=385), "INVALID_ARGUMENT", "options.dim"),
        ("unknown model", lambda: admin.embed(["a"], model="gpt-17"), "INVALID_ARGUMENT", "options.model"),
        ("unknown collection", lambda: admin.get_collection("ghost"), "NOT_FOUND", "'ghost'"),
        ("unknown collection (search)", lambda: admin.search("ghost", "q"), "NOT_FOUND", "'ghost'"),
        ("unknown job", lambda: admin.get_job(987654), "NOT_FOUND", "987654"),
        ("missing key", lambda: SieveClient(t, retry=NO_RETRY).embed(["a"]), "UNAUTHENTICATED", "missing API key"),
        ("wrong key", lambda: SieveClient(t, api_key="nope", retry=NO_RETRY).embed(["a"]), "UNAUTHENTICATED",
         "invalid API key"),
        ("unscoped key", lambda: SieveClient(t, api_key=embed_only, retry=NO_RETRY).search("guarded", "q"),
         "PERMISSION_DENIED", "search:guarded"),
        ("oversize message", lambda: raw(embed_pb2.EmbedRequest(texts=["x" * 300_000])), "RESOURCE_EXHAUSTED",
         "larger than max"),
        ("expired deadline", lambda: raw(embed_pb2.EmbedRequest(texts=TEXTS * 20), timeout=0.0005),
         "DEADLINE_EXCEEDED", ""),
        ("rerank: no passages", lambda: admin.rerank("q", []), "INVALID_ARGUMENT", "passages: empty"),
        ("rerank: too many passages", lambda: admin.rerank("q", ["p"] * 101), "INVALID_ARGUMENT", "passages: 101"),
        ("answer: empty question", lambda: list(admin.answer(" ", passages=["p"])), "INVALID_ARGUMENT",
         "question: empty"),
        ("answer: nothing to answer from", lambda: list(admin.answer("q?")), "INVALID_ARGUMENT", "collection:"),
        ("answer: unknown collection", lambda: list(admin.answer("q?", collection="ghost")), "NOT_FOUND", "'ghost'"),
        ("answer: unscoped key", lambda: list(SieveClient(t, api_key=embed_only, retry=NO_RETRY).answer(
            "q?", passages=["p"])), "PERMISSION_DENIED", "'answer'"),
    ]
    failures = []
    for name, call, code, words in cases:
        try:
            call()
            failures.append(f"{name}: no error")
            continue
        except grpc.RpcError as e:
            got, message = e.code().name, e.details() or ""
        except Exception as e:  # the SDK's typed errors
            got, message = getattr(e, "code", grpc.StatusCode.UNKNOWN).name, getattr(e, "message", str(e))
        if got != code or words not in message:
            failures.append(f"{name}: {got} {message!r}, wanted {code} with {words!r}")
    assert not failures, "\n".join(failures)
    assert isinstance(_raises(lambda: admin.embed([])), InvalidArgument)
    assert isinstance(_raises(lambda: SieveClient(t, retry=NO_RETRY).embed(["a"])), Unauthenticated)
    assert isinstance(_raises(lambda: SieveClient(t, api_key=embed_only, retry=NO_RETRY).search("guarded", "q")),
                      PermissionDenied)
    assert admin.health() == "SERVING" and len(admin.embed(["still serving"])) == 1
    admin.delete_collection("guarded")
    admin.close()


def _raises(call):
    try:
        call()
    except Exception as e:
        return e
    return None


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{name} ([0-9.e+]+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def test_200_concurrent_callers_merge_and_only_overload_errors(served):
    url = f"http://127.0.0.1:{served['metrics']}/metrics"
    before = urllib.request.urlopen(url, timeout=5).read().decode()

    async def go():
        async with AsyncSieveClient(served["target"], api_key=ADMIN, retry=NO_RETRY) as c:
            await c.info()

            async def one(i):
                try:
                    r = await c.embed([f"caller {i} asks something", f"and adds a second text {i}"], timeout=60)
                    return "ok" if len(r) == 2 and r.dim == 384 else "wrong"
                except ResourceExhausted:
                    return "ResourceExhausted"
                except Exception as e:
                    return f"{type(e).__name__}: {e}"

            return await asyncio.gather(*(one(i) for i in range(200)))

    outcomes = asyncio.run(go())
    assert set(outcomes) <= {"ok", "ResourceExhausted"}, {o for o in outcomes if o not in ("ok",)}
    assert outcomes.count("ok") >= 32  # the queue holds 64 texts: at least 32 calls of 2 get in
    after = urllib.request.urlopen(url, timeout=5).read().decode()
    calls = _metric(after, "sieve_batch_requests_sum") - _metric(before, "sieve_batch_requests_sum")
    batches = _metric(after, "sieve_batch_requests_count") - _metric(before, "sieve_batch_requests_count")
    assert calls == outcomes.count("ok")
    assert calls / batches > 2, (calls, batches)  # requests were merged into shared forwards
    if "ResourceExhausted" in outcomes:
        assert _metric(after, "sieve_queue_rejected_total") > _metric(before, "sieve_queue_rejected_total")
    assert 'sieve_rpc_requests_total{code="OK",method="/sieve.v1.EmbedService/Embed"}' in after
