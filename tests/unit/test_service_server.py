"""The gRPC server in-process with a tiny random embedder, through the SDK: results equal `Embedder.encode`,
bad input gets the right status naming the field, auth, health, reflection, metrics, TLS, graceful shutdown."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
import urllib.request

import grpc
import numpy as np
import pytest
import torch
from sieve.backbone import load_backbone
from sieve.embedder import Embedder, LLMEncoder
from sieve.service import create_server
from sieve.service.auth import create_key, revoke_key
from sieve.service.models import ModelPool
from sieve_client import (
    AsyncSieveClient,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RetryPolicy,
    SieveClient,
    Unauthenticated,
    Unavailable,
)
from sieve_client._proto import embed_pb2, embed_pb2_grpc
from torch.testing import assert_close

from sieve.settings import Settings

from .tiny_files import write_tiny_gguf

TEXTS = ["hello world", "the longest text of them all, with many more words than the others in here", "short",
         "hello there, world of retrieval"]
NO_RETRY = RetryPolicy(attempts=1)


@pytest.fixture(scope="module")
def embedder(tmp_path_factory):
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("emb") / "tiny.gguf"
    write_tiny_gguf(path)
    bb = load_backbone(path, home=tmp_path_factory.mktemp("home"), device="cpu", dtype="float32")
    emb = Embedder(LLMEncoder(bb, name="tiny", max_length=48), query_instruction="Query: ")
    emb.calibrate(TEXTS * 3 + ["more text", "and another piece of text", "w" * 20])
    return emb


class Running:
    """A server on its own event loop in a thread, so the blocking SDK can call it from the test."""

    def __init__(self, settings, **kw):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(self._create(settings, kw))
        self.port = self.server.port
        self.target = f"127.0.0.1:{self.port}"

    async def _create(self, settings, kw):
        server = create_server(settings, **kw)
        await server.start()
        return server

    def run(self, coro, timeout=60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def client(self, **kw) -> SieveClient:
        kw.setdefault("retry", NO_RETRY)
        return SieveClient(self.target, **kw)

    def stop(self):
        self.run(self.server.stop(grace=2))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def settings_for(tmp_path, **kw) -> Settings:
    kw.setdefault("grpc_port", 0)
    kw.setdefault("metrics_port", 0)
    kw.setdefault("max_texts_per_request", 16)
    kw.setdefault("max_message_bytes", 64 * 1024)
    kw.setdefault("auth_cache_s", 0)
    kw.setdefault("embedder", "tiny")
    return Settings(home=tmp_path, **kw)


def store(tmp_path):
    from sieve.store import make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'sieve.db'}"
    upgrade(url)
    return make_engine(url)


@pytest.fixture
def server(tmp_path, embedder):
    running = Running(settings_for(tmp_path), models=ModelPool.preloaded({"tiny": embedder}, default="tiny"),
                      engine=store(tmp_path))
    running.run(running.server.wait_ready(10))
    yield running
    running.stop()


def test_configured_batch_budget_reaches_the_batcher(tmp_path, embedder):
    running = Running(settings_for(tmp_path, max_batch_tokens=512),
                      models=ModelPool.preloaded({"tiny": embedder}, default="tiny"))
    try:
        assert running.server.state.batcher.max_batch_tokens == 512
    finally:
        running.stop()


def test_embed_through_the_server_equals_encode(server, embedder):
    with server.client() as c:
        got = c.embed(TEXTS)
        assert got.dim == 64 and got.model == "tiny" and got.tokens > 0
        assert_close(got.to_numpy(), embedder.encode(TEXTS), rtol=1e-5, atol=1e-5)
        q = c.embed(TEXTS, query=True, dim=16, pooling="last")
        assert_close(q.to_numpy(), embedder.encode_queries(TEXTS, dim=16, pooling="last"), rtol=1e-5, atol=1e-5)
        i8 = c.embed(TEXTS, precision="int8").to_numpy()
        assert i8.dtype == np.int8
        assert np.abs(i8.astype(int) - embedder.encode(TEXTS, precision="int8").astype(int)).max() <= 1
        b = c.embed(TEXTS, precision="binary", instruction="Passage: ")
        assert b.to_numpy().tolist() == embedder.encode(TEXTS, precision="binary", instruction="Passage: ").tolist()


def test_big_embed_calls_are_split_and_joined_in_order(server, embedder):
    texts = [f"text number {i} " + "word " * (i % 7) for i in range(40)]  # server limit: 16 per call
    with server.client() as c:
        got = c.embed(texts)
        assert len(got.request_ids) == 3
        assert_close(got.to_numpy(), embedder.encode(texts), rtol=1e-5, atol=1e-5)


def test_embed_stream_answers_each_message_in_order(server, embedder):
    batches = [TEXTS[:2], TEXTS[2:], ["one more"]]
    with server.client() as c:
        results = list(c.embed_stream(batches, dim=32))
    assert [len(r) for r in results] == [2, 2, 1]
    for r, batch in zip(results, batches):
        assert_close(r.to_numpy(), embedder.encode(batch, dim=32), rtol=1e-5, atol=1e-5)


def test_tokenize_and_info(server, embedder):
    with server.client() as c:
        toks = c.tokenize(["hello world"], query=True)
        info = c.info()
    ids, flags = embedder.encoder.prepare("hello world", "Query: ", True)
    assert toks[0].ids == ids and toks[0].instruction_tokens == flags.count(0) > 0
    assert len(toks[0].pieces) == len(ids)
    assert info.default_model == "tiny" and info.models[0].dim == 64 and info.models[0].int8_calibrated
    assert info.limits["max_texts_per_request"] == 16 and info.auth_enabled is False
    assert info.limits["max_batch_tokens"] == 2048  # unset: the CPU default the batcher runs with


def _raw_embed(target, request, **kw):
    with grpc.insecure_channel(target) as ch:
        return embed_pb2_grpc.EmbedServiceStub(ch).Embed(request, **kw)


BAD = [  # (request, status, words the message must contain)
    (embed_pb2.EmbedRequest(), "INVALID_ARGUMENT", "texts: empty"),
    (embed_pb2.EmbedRequest(texts=["a"] * 17), "INVALID_ARGUMENT", "texts: 17 texts"),
    (embed_pb2.EmbedRequest(texts=["ok", "word " * 100], options=embed_pb2.EmbedOptions(truncate=False)),
     "INVALID_ARGUMENT", "texts[1]"),
    (embed_pb2.EmbedRequest(texts=["a"], options=embed_pb2.EmbedOptions(pooling=9)), "INVALID_ARGUMENT",
     "options.pooling"),
    (embed_pb2.EmbedRequest(texts=["a"], options=embed_pb2.EmbedOptions(precision=7)), "INVALID_ARGUMENT",
     "options.precision"),
    (embed_pb2.EmbedRequest(texts=["a"], options=embed_pb2.EmbedOptions(dim=65)), "INVALID_ARGUMENT",
     "options.dim: must be between 1 and 64"),
    (embed_pb2.EmbedRequest(texts=["a"], options=embed_pb2.EmbedOptions(dim=0)), "INVALID_ARGUMENT", "options.dim"),
    (embed_pb2.EmbedRequest(texts=["a"], options=embed_pb2.EmbedOptions(model="nope")), "INVALID_ARGUMENT",
     "options.model: unknown model 'nope'"),
    (embed_pb2.EmbedRequest(texts=["x" * 70_000]), "RESOURCE_EXHAUSTED", "larger than max"),
]


@pytest.mark.parametrize("request_, code, words", BAD, ids=[b[2].split(":")[0] + str(i) for i, b in enumerate(BAD)])
def test_bad_embed_input_gets_the_right_status_naming_the_field(server, request_, code, words):
    with pytest.raises(grpc.RpcError) as e:
        _raw_embed(server.target, request_, timeout=10)
    assert e.value.code().name == code, e.value.details()
    assert words in e.value.details()


def test_other_bad_input_and_the_server_stays_healthy(server):
    with server.client() as c:
        with pytest.raises(NotFound, match="'ghost'"):
            c.get_collection("ghost")
        with pytest.raises(NotFound):
            c.get_job(12345)
        with pytest.raises(InvalidArgument, match="documents: empty"):
            c.upsert("ghost", [])
        with pytest.raises(InvalidArgument, match=r"documents\[0\].id"):
            c.upsert("ghost", [("", "text")])
        with pytest.raises(InvalidArgument, match="dim: must be between"):
            c.create_collection("docs", dim=1000)
        with pytest.raises(InvalidArgument, match="query: empty"):
            c.search("ghost", "  ")
        with pytest.raises(grpc.RpcError) as e:  # an expired deadline
            _raw_embed(server.target, embed_pb2.EmbedRequest(texts=TEXTS * 4), timeout=0.0001)
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        with pytest.raises(InvalidArgument, match=r"messages\[1\].options"):
            with grpc.insecure_channel(server.target) as ch:
                msgs = [embed_pb2.EmbedStreamRequest(texts=["a"]),
                        embed_pb2.EmbedStreamRequest(texts=["b"], options=embed_pb2.EmbedOptions(query=True))]
                try:
                    list(embed_pb2_grpc.EmbedServiceStub(ch).EmbedStream(iter(msgs), timeout=10))
                except grpc.RpcError as err:
                    from sieve_client.errors import from_rpc_error

                    raise from_rpc_error(err) from None
        assert c.health() == "SERVING" and c.health("sieve.v1.EmbedService") == "SERVING"
        assert len(c.embed(["still fine"])) == 1


def test_collections_through_the_server(server):
    with server.client() as c:
        made = c.create_collection("docs", dim=32, metric="l2")
        assert (made.name, made.dim, made.metric, made.embedder, made.documents) == ("docs", 32, "l2", "tiny", 0)
        assert [x.name for x in c.list_collections()] == ["docs"]
        assert c.get_collection("docs").dim == 32
        with pytest.raises(Exception, match="already exists"):
            c.create_collection("docs")
        c.delete_collection("docs")
        assert c.list_collections() == []


def test_metrics_endpoint_counts_calls_by_method_and_code(server):
    with server.client() as c:
        c.embed(["a", "b"])
        with pytest.raises(InvalidArgument):
            c.embed([])
    want = ['sieve_rpc_requests_total{code="OK",method="/sieve.v1.EmbedService/Embed"} 1.0',
            'sieve_rpc_requests_total{code="INVALID_ARGUMENT",method="/sieve.v1.EmbedService/Embed"} 1.0']
    # grpc's context.abort sends the status before the handler's exception unwinds through the metrics
    # interceptor, so a client can see the error a moment before the server has counted it: poll briefly.
    url, deadline = f"http://127.0.0.1:{server.server.metrics_port}/metrics", time.monotonic() + 10
    while True:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        if all(line in text for line in want) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert all(line in text for line in want), [line for line in want if line not in text]
    assert "sieve_batch_texts_count" in text and "sieve_queue_depth 0.0" in text
    assert "sieve_batch_tokens_total" in text and "sieve_tokens_per_second" in text


def test_request_id_is_echoed(server):
    with grpc.insecure_channel(server.target) as ch:
        response, call = embed_pb2_grpc.EmbedServiceStub(ch).Embed.with_call(
            embed_pb2.EmbedRequest(texts=["a"]), metadata=(("x-request-id", "req-42"),), timeout=10)
    assert response.metadata.request_id == "req-42"
    assert ("x-request-id", "req-42") in tuple(call.initial_metadata())


def test_reflection_lists_the_services(server):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.target) as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                   timeout=10))
    names = {s.name for s in responses[0].list_services_response.service}
    assert {"sieve.v1.EmbedService", "sieve.v1.InfoService", "sieve.v1.SearchService", "sieve.v1.DocumentService",
            "sieve.v1.CollectionService", "sieve.v1.RerankService", "sieve.v1.AnswerService",
            "grpc.health.v1.Health"} <= names


def test_rerank_and_answer_check_input_before_loading_their_models(server):
    """(tests/unit/test_service_generation.py runs them on tiny models; here the settings' real ones stay unloaded)"""
    with server.client() as c:
        with pytest.raises(InvalidArgument, match="passages: empty"):
            c.rerank("q", [])
        with pytest.raises(InvalidArgument, match="question: empty"):
            list(c.answer("  ", passages=["because"]))
        with pytest.raises(InvalidArgument, match="collection: set a collection"):
            list(c.answer("why?"))
        info = c.info()
    assert (info.reranker.name, info.reranker.loaded) == ("sieve-rank", False)
    assert (info.answerer.name, info.answerer.loaded) == ("refrag-k16", False)


def test_api_keys_and_scopes(tmp_path, embedder):
    engine = store(tmp_path)
    running = Running(settings_for(tmp_path, admin_key="root-key"),
                      models=ModelPool.preloaded({"tiny": embedder}, default="tiny"), engine=engine)
    try:
        _, embed_key = create_key(engine, "embedder", ["embed"])
        info, docs_key = create_key(engine, "docs reader", ["search:docs"])
        with running.client(api_key="root-key") as admin:
            admin.create_collection("docs")
            admin.create_collection("other")
            assert admin.info().auth_enabled
        with running.client() as anonymous:
            with pytest.raises(Unauthenticated, match="missing API key"):
                anonymous.embed(["a"])
            assert anonymous.health() == "SERVING"  # health needs no key
        with running.client(api_key="sk-sieve-wrong") as wrong:
            with pytest.raises(Unauthenticated, match="invalid API key"):
                wrong.embed(["a"])
        with running.client(api_key=embed_key) as c:
            assert len(c.embed(["a"])) == 1
            with pytest.raises(PermissionDenied, match="needs scope 'search:docs'"):
                c.search("docs", "q")
            with pytest.raises(PermissionDenied, match="manage:new"):
                c.create_collection("new")
            assert c.list_collections() == []
        with running.client(api_key=docs_key) as c:
            with pytest.raises(PermissionDenied, match="needs scope 'embed'"):
                c.embed(["a"])
            assert [x.name for x in c.list_collections()] == ["docs"]
            with pytest.raises(PermissionDenied, match="search:other"):
                c.get_collection("other")
            revoke_key(engine, info.id)
            with pytest.raises(Unauthenticated):
                c.list_collections()
    finally:
        running.stop()


def test_auth_is_off_only_without_admin_key_and_without_keys(tmp_path, embedder):
    engine = store(tmp_path)
    running = Running(settings_for(tmp_path), models=ModelPool.preloaded({"tiny": embedder}, default="tiny"),
                      engine=engine)
    try:
        with running.client() as c:
            assert c.info().auth_enabled is False and len(c.embed(["a"])) == 1
            create_key(engine, "first", ["embed"])  # the first key turns auth on
            assert c.info().auth_enabled is True
            with pytest.raises(Unauthenticated):
                c.embed(["a"])
    finally:
        running.stop()


def test_health_is_not_serving_while_the_model_loads(tmp_path, embedder):
    gate = threading.Event()

    def slow_loader(name):
        gate.wait(20)
        return embedder

    running = Running(settings_for(tmp_path), models=ModelPool(slow_loader, default="tiny"))
    try:
        with running.client() as c:
            assert c.health() == "NOT_SERVING" and c.health("sieve.v1.EmbedService") == "NOT_SERVING"
            assert c.health("sieve.v1.InfoService") == "SERVING"
            with pytest.raises(Unavailable, match="still loading"):
                c.embed(["a"])
            gate.set()
            c.wait_until_serving(timeout=20)
            assert c.health("sieve.v1.EmbedService") == "SERVING" and len(c.embed(["a"])) == 1
    finally:
        gate.set()
        running.stop()


def test_graceful_shutdown_finishes_in_flight_calls(tmp_path, embedder):
    from sieve.service.batcher import run_encoder

    def slow(group, items):
        time.sleep(0.5)
        return run_encoder(group, items)

    running = Running(settings_for(tmp_path), models=ModelPool.preloaded({"tiny": embedder}, default="tiny"),
                      runner=slow)
    c = running.client()
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=c.embed(["in flight"])))
    t.start()
    time.sleep(0.2)  # the call is in the model now
    stopping = asyncio.run_coroutine_threadsafe(running.server.stop(grace=5), running.loop)
    time.sleep(0.05)
    t.join(10)
    stopping.result(10)
    assert len(result["r"]) == 1
    with pytest.raises(Unavailable):
        c.embed(["after"], timeout=2)
    c.close()
    running.loop.call_soon_threadsafe(running.loop.stop)


def test_tls(tmp_path, embedder):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
                   check=True, capture_output=True)
    running = Running(settings_for(tmp_path, tls_cert=cert, tls_key=key),
                      models=ModelPool.preloaded({"tiny": embedder}, default="tiny"))
    try:
        target = f"localhost:{running.port}"
        with SieveClient(target, root_certificates=cert, retry=NO_RETRY) as c:
            assert len(c.embed(["over tls"])) == 1
        with SieveClient(target, retry=NO_RETRY, timeout=3) as plain:
            with pytest.raises(Unavailable):
                plain.embed(["no tls"])
    finally:
        running.stop()


def test_async_client_and_concurrent_callers_merge(tmp_path, embedder):
    running = Running(settings_for(tmp_path, max_queued_texts=24),
                      models=ModelPool.preloaded({"tiny": embedder}, default="tiny"))

    async def callers():
        async with AsyncSieveClient(running.target, retry=NO_RETRY) as c:
            sem = asyncio.Semaphore(64)

            async def one(i):
                async with sem:
                    try:
                        r = await c.embed([f"caller {i}", "and a second text"])
                        return "ok" if len(r) == 2 else "wrong"
                    except Exception as e:
                        return type(e).__name__

            return await asyncio.gather(*(one(i) for i in range(200)))

    try:
        outcomes = asyncio.run(callers())
        assert set(outcomes) <= {"ok", "ResourceExhausted"}, set(outcomes)
        assert outcomes.count("ok") > 0
        metrics = running.server.state.metrics
        def histogram(h):
            samples = h.collect()[0].samples
            return tuple(next(s.value for s in samples if s.name.endswith(end)) for end in ("_count", "_sum"))

        forwards, calls = histogram(metrics.batch_requests)
        assert histogram(metrics.batch_texts) == (forwards, 2 * outcomes.count("ok"))  # each text in one forward
        assert calls / forwards > 1.5  # calls were merged into shared forwards
    finally:
        running.stop()
