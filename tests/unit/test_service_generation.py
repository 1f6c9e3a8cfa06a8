"""Rerank, Search(rerank=true) and Answer through the in-process server and the SDK, on tiny random models that
share one decoder (so they share one lane): results equal the libraries', bad input names the field, the lane is
bounded, cancellation stops generation, models load lazily once and say why when they cannot."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import grpc
import pytest
import torch
from sieve.backbone import ModelArgs, load_backbone
from sieve.refrag import Answerer, EncodedPassage, Projector, Refrag
from sieve.refrag.policy import n_expanded
from sieve.reranker import Reranker
from sieve.service.errors import Expired, QueueFull
from sieve.service.generation import Generators, Lane, refrag_block_sizes
from sieve.service.models import ModelPool
from sieve_client import (
    AsyncSieveClient,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from sieve_client._proto import rerank_pb2, rerank_pb2_grpc

from .test_refrag import HashEncoder, text
from .test_service_server import NO_RETRY, Running, embedder, settings_for, store  # noqa: F401 (a fixture)
from .tiny_files import write_tiny_gguf

QUERY = "aspirin heart risk"
PASSAGES = ["aspirin lowers the risk of a heart attack", "the eiffel tower is in paris", "",
            "heart disease and aspirin: a study", "gene expression in the cell"]


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    torch.set_num_threads(1)
    args = ModelArgs.from_name("tiny")
    args.max_seq_len = 4096
    path = tmp_path_factory.mktemp("gen") / "tiny.gguf"
    write_tiny_gguf(path, args)
    return load_backbone(path, home=tmp_path_factory.mktemp("gen-home"), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def reranker(decoder):
    return Reranker(decoder, name="tiny-rank", max_passage_tokens=64)


class RecordingAnswerer(Answerer):
    """The real answer loop; remembers its streams, and sleeps `delay` s per token when asked to (cancel tests)."""

    def __init__(self, refrag):
        super().__init__(refrag)
        self.streams = []
        self.delay = 0.0

    def stream(self, *a, **kw):
        s = super().stream(*a, **kw)
        self.streams.append(s)
        return s

    def _decode(self, *a, **kw):  # token ids, then (as the generator's value) why it stopped
        ids = super()._decode(*a, **kw)
        while True:
            try:
                token = next(ids)
            except StopIteration as stop:
                return stop.value
            time.sleep(self.delay)
            yield token


@pytest.fixture(scope="module")
def refrag(decoder):
    torch.manual_seed(0)
    projector = Projector(HashEncoder.dim, decoder.args.dim, 32, out_rms=0.08).eval().requires_grad_(False)
    return Refrag(decoder.model, decoder.tokenizer, HashEncoder(), projector, k=4, name="tiny-refrag")


@pytest.fixture
def answerer(refrag):
    return RecordingAnswerer(refrag)


def serve(tmp_path, embedder, generation, **settings):  # noqa: F811
    settings.setdefault("max_rerank_passages", 8)
    settings.setdefault("rerank_depth", 5)
    settings.setdefault("max_new_tokens", 300)
    running = Running(settings_for(tmp_path, **settings), models=ModelPool.preloaded({"tiny": embedder},
                                                                                     default="tiny"),
                      engine=store(tmp_path), generation=generation)
    running.run(running.server.wait_ready(10))
    return running


@pytest.fixture
def server(tmp_path, embedder, reranker, answerer):  # noqa: F811
    running = serve(tmp_path, embedder, Generators.preloaded(reranker=reranker, answerer=answerer))
    yield running
    running.stop()


# ------------------------------------------------------------------------------------------------------ rerank


@pytest.mark.parametrize("mode", ["full", "first", "sliding", "inline", "likelihood"])
def test_rerank_through_the_server_equals_the_library(server, reranker, mode):
    want = reranker.rank(QUERY, PASSAGES, mode=mode)
    with server.client() as c:
        got = c.rerank(QUERY, PASSAGES, mode=mode, return_text=True)
    assert got.order == want.order and sorted(got.order) == list(range(len(PASSAGES)))
    assert [r.score for r in got] == pytest.approx(want.scores, abs=1e-4)
    assert [r.text for r in got] == [PASSAGES[i] for i in want.order]
    assert (got.model, got.mode, got.passage_cap) == ("tiny-rank", mode, want.stats.passage_cap)
    assert got.tokens == want.stats.tokens_processed > 0 and got.seconds > 0


def test_rerank_defaults_are_the_models_and_fuse_is_per_call(server, reranker, monkeypatch):
    """An unset mode / fuse takes the served reranker's own defaults (its reranker.json); a call can override
    either; fused answers say so and carry the RRF order of the mode's order and the request order."""
    from sieve.reranker.fusion import fuse_with_input_order

    monkeypatch.setattr(reranker, "mode", "inline")
    monkeypatch.setattr(reranker, "fuse", True)
    inline = reranker.rank(QUERY, PASSAGES, mode="inline", fuse=False)
    with server.client() as c:
        default = c.rerank(QUERY, PASSAGES)
        assert (default.mode, default.fused) == ("inline", True)
        assert default.order == fuse_with_input_order(inline.order, len(PASSAGES))[0]
        plain = c.rerank(QUERY, PASSAGES, fuse=False)
        assert (plain.mode, plain.fused, plain.order) == ("inline", False, inline.order)
        full = c.rerank(QUERY, PASSAGES, mode="full", fuse=False)
        assert (full.mode, full.fused) == ("full", False)
        assert full.order == reranker.rank(QUERY, PASSAGES, mode="full", fuse=False).order


def test_rerank_top_k_keeps_the_best_k(server, reranker):
    want = reranker.rank(QUERY, PASSAGES, mode="full", top_k=2)
    with server.client() as c:
        got = c.rerank(QUERY, PASSAGES, top_k=2)
        assert got.order == want.order and len(got) == 2 and got[0].text is None
        assert c.rerank(QUERY, PASSAGES[:2], top_k=10).order in ([0, 1], [1, 0])  # more than n: all of them


def test_rerank_bad_input_names_the_field(server):
    with server.client() as c:
        with pytest.raises(InvalidArgument, match="query: empty"):
            c.rerank("  ", ["a"])
        with pytest.raises(InvalidArgument, match="passages: empty"):
            c.rerank("q", [])
        with pytest.raises(InvalidArgument, match="passages: 9 passages, over this server's limit of 8"):
            c.rerank("q", ["p"] * 9)
        with pytest.raises(ValueError, match="unknown mode 'pairwise'"):  # refused by the SDK already
            c.rerank("q", ["a"], mode="pairwise")
        with grpc.insecure_channel(server.target) as ch, pytest.raises(grpc.RpcError) as e:
            rerank_pb2_grpc.RerankServiceStub(ch).Rerank(rerank_pb2.RerankRequest(query="q", passages=["a"], mode=9),
                                                         timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "mode: unknown value 9" in e.value.details()
        assert c.health("sieve.v1.RerankService") == "SERVING" and len(c.rerank("q", ["a", "b"])) == 2


def test_info_names_the_models_and_limits(server):
    with server.client() as c:
        info = c.info()
    assert (info.reranker.name, info.reranker.loaded) == ("tiny-rank", True)
    assert (info.answerer.name, info.answerer.block_size) == ("tiny-refrag", 4)
    assert [(a.name, a.block_size) for a in info.answerers] == [("tiny-refrag", 4)]
    assert (info.answerer.default_expansion, info.answerer.default_policy) == (0.25, "similarity")
    assert (info.reranker.default_expansion, info.reranker.default_policy) == (None, "")
    assert info.limits["max_rerank_passages"] == 8 and info.limits["max_new_tokens"] == 300


def test_info_reads_an_unloaded_models_answer_defaults_from_its_folder(tmp_path):
    """Before a REFRAG model loads, Info reads its defaults from refrag.json; a folder it cannot read gives none."""
    import json
    from types import SimpleNamespace

    from sieve.refrag.model_dir import CONFIG, RefragConfig
    from sieve.service.embed import _answer_defaults

    assert _answer_defaults(SimpleNamespace(model=None, name="refrag-k16")) == {"default_expansion": 0.25,
                                                                                 "default_policy": "similarity"}
    RefragConfig(expansion=0.5, policy="recency").save(tmp_path)
    assert _answer_defaults(SimpleNamespace(model=None, name=str(tmp_path))) == {"default_expansion": 0.5,
                                                                                  "default_policy": "recency"}
    (tmp_path / CONFIG).write_text("{not json")
    assert _answer_defaults(SimpleNamespace(model=None, name=str(tmp_path))) == {}
    assert _answer_defaults(SimpleNamespace(model=None, name=str(tmp_path / "nowhere"))) == {}
    assert json.loads(json.dumps(_answer_defaults(SimpleNamespace(model=None, name="refrag-k8"))))


# ------------------------------------------------------------------------------------------------------ answer


def test_answer_streams_the_library_answer_with_the_passages_used(server, refrag):
    passages = [text(10, 1), text(13, 2)]
    want = Answerer(refrag).stream("which gene?", passages, max_new_tokens=8)
    want_pieces = list(want)
    with server.client() as c:
        stream = c.answer("which gene?", passages=passages, max_new_tokens=8)
        pieces = list(stream)
    assert pieces == [p for p in want_pieces if p] and stream.text == "".join(want_pieces)
    assert [x.index for x in stream.citations] == [0, 1] and stream.citations[0].chunk_id == 0
    assert stream.finish_reason == want.stats.stopped and stream.finish_reason in ("eos", "max_new_tokens")
    u = stream.usage
    assert (u.prompt_positions, u.full_prompt_tokens, u.generated_tokens) == (
        want.stats.prompt_positions, want.stats.full_prompt_tokens, want.stats.generated_tokens)
    assert u.prompt_positions < u.full_prompt_tokens and u.precomputed_passages == 0
    assert u.expanded_blocks == want.stats.expanded == n_expanded(u.blocks, refrag.expansion) > 0  # model's default
    assert stream.tokens == u.prompt_positions + u.generated_tokens


def test_answer_expansion_zero_compresses_every_block_and_unset_takes_the_models_default(server, refrag):
    """Unset expansion / policy: the served model's defaults (refrag.json); an explicit 0 is not 'unset'."""
    passages = [text(30, 1), text(30, 2), text(30, 3)]
    with server.client() as c:
        unset = c.answer("cancer blood", passages=passages, max_new_tokens=3)
        unset.read()
        zero = c.answer("cancer blood", passages=passages, expansion=0.0, max_new_tokens=3)
        zero.read()
        said = c.answer("cancer blood", passages=passages, expansion=refrag.expansion, policy=refrag.policy,
                        max_new_tokens=3)
        said.read()
    assert zero.usage.expanded_blocks == 0 and zero.usage.prompt_positions < unset.usage.prompt_positions
    assert unset.usage.expanded_blocks == n_expanded(unset.usage.blocks, refrag.expansion) > 0
    assert (unset.usage.prompt_positions, unset.text) == (said.usage.prompt_positions, said.text)


def test_answer_with_expansion_and_the_async_client(server, refrag):
    passages = [text(30, 1), text(30, 2)]
    want = Answerer(refrag).stream("cancer blood", passages, expansion=1.0, max_new_tokens=5)
    want_text = "".join(want)

    async def go():
        async with AsyncSieveClient(server.target, retry=NO_RETRY) as c:
            stream = c.answer("cancer blood", passages=passages, expansion=1.0, max_new_tokens=5)
            got = [p async for p in stream]
            return got, stream

    got, stream = asyncio.run(go())
    assert "".join(got) == want_text and stream.usage.expanded_blocks == stream.usage.blocks > 0
    assert stream.usage.prompt_positions == stream.usage.full_prompt_tokens


def test_answer_expands_the_blocks_the_policy_picks(server, refrag):
    """The request's policy reaches the answerer: recency and similarity answer as the library does with each."""
    passages = [text(30, 1), text(30, 2), text(30, 3)]
    picked = {}
    with server.client() as c:
        for policy in ("recency", "similarity"):
            want = Answerer(refrag).stream("cancer blood", passages, expansion=0.34, policy=policy, max_new_tokens=5)
            want_text, picked[policy] = "".join(want), want.expanded
            stream = c.answer("cancer blood", passages=passages, expansion=0.34, policy=policy, max_new_tokens=5)
            assert stream.read() == want_text
            assert stream.usage.expanded_blocks == want.stats.expanded > 0
            assert stream.usage.prompt_positions == want.stats.prompt_positions
    assert picked["recency"] != picked["similarity"]  # so the answers above tell the policies apart


def test_block_size_picks_the_model_trained_for_it(tmp_path, embedder, answerer, refrag, decoder):  # noqa: F811
    """A call's block_size routes to the served REFRAG model of that k (its own projector, its answer, its name in
    the usage); 0 and the default's k take the default; a size no model was trained for names the served ones."""
    torch.manual_seed(1)
    projector = Projector(HashEncoder.dim, decoder.args.dim, 32, out_rms=0.08).eval().requires_grad_(False)
    refrag8 = Refrag(decoder.model, decoder.tokenizer, HashEncoder(), projector, k=8, name="tiny-refrag-k8")
    running = serve(tmp_path, embedder, Generators.preloaded(answerer=answerer, more_answerers=[Answerer(refrag8)]))
    passages = [text(40, 1), text(21, 2)]
    try:
        with running.client() as c:
            info = c.info()
            assert [(a.name, a.block_size, a.loaded) for a in info.answerers] == [
                ("tiny-refrag", 4, True), ("tiny-refrag-k8", 8, True)]
            for block_size, model in ((8, refrag8), (0, refrag), (4, refrag)):
                want = Answerer(model).stream("which gene?", passages, max_new_tokens=6)
                want_text = "".join(want)
                stream = c.answer("which gene?", passages=passages, max_new_tokens=6, block_size=block_size)
                assert stream.read() == want_text
                u = stream.usage
                assert (u.model, u.block_size) == (model.name, model.k)
                assert (u.blocks, u.prompt_positions) == (want.stats.blocks, want.stats.prompt_positions)
            k8 = c.answer("which gene?", passages=passages, max_new_tokens=1, block_size=8)
            k4 = c.answer("which gene?", passages=passages, max_new_tokens=1)
            k8.read(), k4.read()
            assert k8.usage.blocks < k4.usage.blocks  # 8-token blocks: fewer of them
            with pytest.raises(InvalidArgument) as e:
                list(c.answer("which gene?", passages=passages, block_size=5))
            assert "block_size: 5: no REFRAG model" in e.value.message
            assert "4 (tiny-refrag), 8 (tiny-refrag-k8)" in e.value.message

            c.create_collection("docs")  # workers that store both sizes: each model reads its own, none re-encodes
            _index(running, embedder, refrag, refrag_ks=(4, 8))
            for block_size, model in ((8, refrag8), (0, refrag)):
                rag = c.answer("heart attack risk", collection="docs", k=3, max_new_tokens=3, block_size=block_size)
                rag.read()
                assert (rag.usage.model, rag.usage.precomputed_passages) == (model.name, 3)
    finally:
        running.stop()


def test_refrag_block_sizes_reads_the_configs_without_loading(tmp_path):
    assert refrag_block_sizes("refrag-k16", "refrag-k8, refrag-k32") == (16, {8: "refrag-k8", 32: "refrag-k32"})
    # the default serves its own k: a listed model with that k (or the default itself) is left out
    assert refrag_block_sizes("refrag-k8", "refrag-k8,refrag-k32") == (8, {32: "refrag-k32"})
    assert refrag_block_sizes("refrag-k16", "") == (16, {})
    # an unreadable default is found out by its first call (lazy, as before); an unreadable extra is a config error
    assert refrag_block_sizes(str(tmp_path / "nowhere"), "refrag-k8") == (0, {8: "refrag-k8"})
    with pytest.raises(ValueError, match="refrag_block_models names .*nowhere"):
        refrag_block_sizes("refrag-k16", f"refrag-k8,{tmp_path / 'nowhere'}")
    from sieve.refrag import RefragConfig, resolve_refrag

    twin = tmp_path / "k8-twin"
    twin.mkdir()
    RefragConfig.load(resolve_refrag("refrag-k8")).save(twin)
    with pytest.raises(ValueError, match="both have block size 8"):
        refrag_block_sizes("refrag-k16", f"refrag-k8,{twin}")


BAD_ANSWERS = [  # (kwargs, words of the INVALID_ARGUMENT message)
    ({"question": " ", "passages": ["a"]}, "question: empty"),
    ({"question": "q?"}, "collection: set a collection"),
    ({"question": "q?", "collection": "docs", "passages": ["a"]}, "passages: send either"),
    ({"question": "q?", "passages": ["ok", "  "]}, "passages[1]: empty"),
    ({"question": "q?", "passages": ["ok"] * 51}, "passages: 51 passages"),
    ({"question": "q?", "passages": ["ok"], "expansion": 1.5}, "expansion: must be a fraction"),
    ({"question": "q?", "passages": ["ok"], "policy": "nearest"}, "policy: unknown expansion policy 'nearest'"),
    ({"question": "q?", "passages": [text(30, 1)], "expansion": 0.5, "policy": "learned"},
     "policy: this model has no learned policy"),
    ({"question": "q?", "passages": ["ok"], "max_new_tokens": 301}, "max_new_tokens: 301 is over"),
    ({"question": "q?", "passages": ["ok"], "temperature": -1.0}, "temperature: must be 0"),
    ({"question": "why " * 600, "passages": ["ok"]}, "question: the question is"),
    ({"question": "q?", "passages": [text(400, i) for i in range(4)], "expansion": 1.0},
     "passages: the prompt takes"),
]


@pytest.mark.parametrize(("kwargs", "words"), BAD_ANSWERS, ids=[w.split(":")[0] + str(i)
                                                               for i, (_, w) in enumerate(BAD_ANSWERS)])
def test_answer_bad_input_names_the_field(server, kwargs, words):
    with server.client() as c:
        with pytest.raises(InvalidArgument) as e:
            list(c.answer(**kwargs))
    assert words in e.value.message


def test_cancelling_the_call_stops_generation_and_frees_the_decoder(server, answerer):
    answerer.delay = 0.02
    with server.client() as c:
        stream = c.answer("q?", passages=[text(20, 1)], max_new_tokens=250)
        next(iter(stream))  # generating now
        stream.cancel()
        assert list(stream) == []  # ends quietly: the caller cancelled it
        lib = answerer.streams[-1]
        deadline = time.monotonic() + 10
        while lib.stats.stopped == "" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lib.stats.stopped == "cancelled" and lib.stats.generated_tokens < 50
        answerer.delay = 0.0
        assert c.answer("q?", passages=[text(5, 1)], max_new_tokens=3).read() is not None  # the lane is free


def test_a_deadline_ends_a_long_answer(server, answerer):
    answerer.delay = 0.02
    with server.client() as c:
        with pytest.raises(Exception, match="DEADLINE_EXCEEDED"):
            list(c.answer("q?", passages=[text(20, 1)], max_new_tokens=250, timeout=0.5))
    lib = answerer.streams[-1]
    deadline = time.monotonic() + 10
    while lib.stats.stopped == "" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lib.stats.stopped == "cancelled" and lib.stats.generated_tokens < 100


def test_a_busy_decoder_refuses_more_than_the_waiting_limit(tmp_path, embedder, reranker, answerer):  # noqa: F811
    running = serve(tmp_path, embedder, Generators.preloaded(reranker=reranker, answerer=answerer,
                                                             max_waiting=0))
    answerer.delay = 0.02
    try:
        with running.client() as c:
            stream = c.answer("q?", passages=[text(20, 1)], max_new_tokens=250)
            next(iter(stream))  # the shared decoder is busy answering
            with pytest.raises(ResourceExhausted, match="busy"):
                c.rerank("q", ["a", "b"])  # same decoder object: same lane
            stream.cancel()
            answerer.delay = 0.0
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert len(c.rerank("q", ["a", "b"])) == 2
                    break
                except ResourceExhausted:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        metrics = running.server.state.metrics.text()
        rejected = re.search(r'^sieve_generation_rejected_total\{lane="decoder-0"\} ([0-9.]+)$', metrics, re.M)
        assert rejected and float(rejected.group(1)) >= 1
    finally:
        answerer.delay = 0.0
        running.stop()


def _slow_steps(decoder, seconds: float) -> None:
    """Each batched step of `decoder` takes `seconds` more (so streams are still decoding when the test looks)."""
    step = decoder.batch.step

    def slow(tokens):
        time.sleep(seconds)
        return step(tokens)

    decoder.batch.step = slow


def _settles(decoder, rows: int) -> None:
    deadline = time.monotonic() + 10
    while decoder.decoding != rows and time.monotonic() < deadline:
        time.sleep(0.02)
    assert decoder.decoding == rows


def test_concurrent_answers_decode_together_and_answer_as_one_at_a_time(tmp_path, embedder, refrag):  # noqa: F811
    questions = [("which gene?", [text(10, 1), text(13, 2)]), ("cancer risk", [text(30, 3)]),
                 ("blood level?", [text(7, 4), text(20, 5)])]
    want = []
    for q, passages in questions:
        s = Answerer(refrag).stream(q, passages, max_new_tokens=12)
        want.append(("".join(s), s.stats.stopped, s.stats.generated_tokens))
    answerer = Answerer(refrag)
    running = serve(tmp_path, embedder, Generators.preloaded(answerer=answerer, answer_batch=4))
    try:
        start = threading.Barrier(len(questions))
        got: list = [None] * len(questions)

        def ask(i):
            q, passages = questions[i]
            with running.client() as c:
                start.wait()
                stream = c.answer(q, passages=passages, max_new_tokens=12)
                text_out = "".join(stream)
                got[i] = (text_out, stream.finish_reason, stream.usage.generated_tokens)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(questions))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert got == want
        assert answerer.decoder is not None and answerer.decoder.widest >= 2  # they shared decoding steps
        _settles(answerer.decoder, 0)
    finally:
        running.stop()


def test_a_full_batched_decoder_refuses_a_cancelled_answer_leaves_and_rerank_runs_between_steps(
        tmp_path, embedder, reranker, refrag):  # noqa: F811
    answerer = Answerer(refrag)
    running = serve(tmp_path, embedder, Generators.preloaded(reranker=reranker, answerer=answerer, max_waiting=0,
                                                             answer_batch=2))
    try:
        with running.client() as c:
            assert c.answer("q?", passages=[text(5, 1)], max_new_tokens=2).read() is not None  # makes the decoder
            decoder = answerer.decoder
            _slow_steps(decoder, 0.02)
            a = c.answer("q?", passages=[text(20, 1)], max_new_tokens=250)
            b = c.answer("gene?", passages=[text(20, 2)], max_new_tokens=250)
            next(iter(a)), next(iter(b))  # both rows decoding
            with pytest.raises(ResourceExhausted, match="limit 0"):
                c.answer("more?", passages=[text(5, 3)], max_new_tokens=3).read()
            assert len(c.rerank("q", ["a", "b"])) == 2  # same decoder, same lane: between two steps
            assert decoder.decoding == 2
            a.cancel()
            assert list(a) == []
            _settles(decoder, 1)  # a's row left at the next step; b goes on
            assert c.answer("more?", passages=[text(5, 3)], max_new_tokens=3).read() is not None
            b.cancel()
            _settles(decoder, 0)
    finally:
        running.stop()


# ------------------------------------------------------------------------------------- collections: search, answer

DOCS = [("heart", "aspirin lowers the risk of a heart attack in older patients"),
        ("paris", "the eiffel tower stands in paris and draws many visitors"),
        ("gene", "gene expression levels change in the cell under stress"),
        ("blood", "blood pressure and heart rate rise with exercise"),
        ("cancer", "cancer study patients received a new treatment"),
        ("protein", "protein folding shapes the function of the cell")]


def _index(server, embedder, refrag, refrag_ks=(4,)):  # noqa: F811
    from sieve.workers import jobs
    from sieve.workers.pipeline import WorkerContext, drain

    engine = server.server.state.engine
    docs = [jobs.DocumentIn(external_id=i, text=t, metadata={"n": n}) for n, (i, t) in enumerate(DOCS)]
    job = jobs.submit_upsert(engine, "docs", docs, enqueue=lambda job_id, n: None)
    state = server.server.state
    ctx = WorkerContext(engine=engine, index_root=state.index_root, model_home=state.settings.home, chunk_tokens=64,
                        chunk_overlap=0, device="cpu", dtype="float32", refrag_ks=refrag_ks,
                        embedders={"tiny": embedder}, block_encoder=refrag.blocks)
    drain(ctx, job.id)
    assert jobs.get_job(engine, job.id).status == "done"


def test_search_with_rerank_and_answer_from_a_collection(server, embedder, reranker, refrag,  # noqa: F811
                                                         monkeypatch):
    from sieve.store import session_scope
    from sieve.store.blocks import fetch_blocks

    with server.client() as c:
        c.create_collection("docs")
        with pytest.raises(FailedPrecondition, match="no indexed passages"):
            list(c.answer("heart?", collection="docs"))
        _index(server, embedder, refrag)
        query = "heart attack risk"
        candidates = c.search("docs", query, k=5)  # the server's rerank depth: 5
        assert len(candidates) == 5 and all(h.vector_score == h.score for h in candidates)
        for mode, fuse in (("full", False), ("inline", True)):  # Search reranks with the reranker's defaults
            monkeypatch.setattr(reranker, "mode", mode)
            monkeypatch.setattr(reranker, "fuse", fuse)
            want = reranker.rank(query, [h.text for h in candidates], top_k=3)
            got = c.search("docs", query, k=3, rerank=True)
            assert [h.chunk_id for h in got] == [candidates[i].chunk_id for i in want.order]
            assert [h.score for h in got] == pytest.approx(want.scores)
            assert [h.vector_score for h in got] == pytest.approx([candidates[i].score for i in want.order])
        with pytest.raises(InvalidArgument, match="k: 9 is over this server's limit of 8 with rerank"):
            c.search("docs", query, k=9, rerank=True)

        stream = c.answer(query, collection="docs", k=2, max_new_tokens=6)
        pieces = list(stream)
        top = candidates[:2]
        assert [(x.chunk_id, x.document_id, x.text) for x in stream.citations] == [
            (h.chunk_id, h.document_id, h.text) for h in top]
        assert stream.usage.precomputed_passages == 2  # the block encodings stored at index time
        with session_scope(server.server.state.engine) as s:
            records = fetch_blocks(s, [h.chunk_id for h in top], 4)
        pre = [EncodedPassage.from_record(records[h.chunk_id], h.text, refrag.tokenizer) for h in top]
        assert "".join(pieces) == "".join(Answerer(refrag).stream(query, pre, max_new_tokens=6))
        filtered = c.answer(query, collection="docs", k=2, max_new_tokens=2, filters={"n": 2})
        filtered.read()
        assert {x.document_id for x in filtered.citations} == {"gene"}  # (its chunks)


def test_blocks_stored_by_another_encoder_are_not_used_and_the_text_is_encoded(server, embedder,  # noqa: F811
                                                                                 refrag):
    """A model with its own (tuned) chunk encoder has another fingerprint: vectors workers stored with a different
    encoder must not enter its decoder; Answer encodes those chunks' text instead, and answers as from texts."""
    from sieve.refrag.encoder import BlockEncoder

    class Renamed(HashEncoder):
        name = "hash-16-tuned"

    other = BlockEncoder(refrag.tokenizer, Renamed())
    assert other.fingerprint != refrag.blocks.fingerprint
    with server.client() as c:
        c.create_collection("docs")
        _index(server, embedder, type("R", (), {"blocks": other})())
        stream = c.answer("heart attack risk", collection="docs", k=2, max_new_tokens=5)
        got = stream.read()
        assert stream.usage.precomputed_passages == 0
        texts = [x.text for x in stream.citations]
        assert got == "".join(Answerer(refrag).stream("heart attack risk", texts, max_new_tokens=5))


def test_answer_and_rerank_scopes(tmp_path, embedder, reranker, answerer):  # noqa: F811
    from sieve.service.auth import create_key

    running = serve(tmp_path, embedder, Generators.preloaded(reranker=reranker, answerer=answerer),
                    admin_key="root")
    try:
        engine = running.server.state.engine
        _, rerank_key = create_key(engine, "ranker", ["rerank"])
        _, docs_key = create_key(engine, "docs", ["search:docs"])
        with running.client(api_key=rerank_key) as c:
            assert len(c.rerank("q", ["a"])) == 1
            with pytest.raises(PermissionDenied, match="needs scope 'answer'"):
                list(c.answer("q?", passages=["a"]))
        with running.client(api_key=docs_key) as c:
            with pytest.raises(PermissionDenied, match="needs scope 'rerank'"):
                c.rerank("q", ["a"])
            with pytest.raises(PermissionDenied, match="search:other"):
                list(c.answer("q?", collection="other"))
    finally:
        running.stop()


# ------------------------------------------------------------------------------------------------ loading


def test_models_load_lazily_once_and_a_failure_says_why(tmp_path, embedder, reranker):  # noqa: F811
    loads = []
    gate = threading.Event()

    def load_reranker():
        loads.append(1)
        gate.wait(20)
        return reranker

    def broken():
        raise FileNotFoundError("no REFRAG model at /nowhere")

    gen = Generators(reranker=load_reranker, answerer=broken, reranker_name="lazy-rank", answerer_name="gone")
    running = serve(tmp_path, embedder, gen)
    try:
        with running.client() as c:
            info = c.info()
            assert (info.reranker.name, info.reranker.loaded) == ("lazy-rank", False) and not loads
            assert c.health("sieve.v1.RerankService") == "SERVING"  # lazy: ready to take calls
            results = []
            callers = [threading.Thread(target=lambda: results.append(c.rerank("q", ["a", "b"]).order))
                       for _ in range(3)]
            for t in callers:
                t.start()
            time.sleep(0.3)
            gate.set()
            for t in callers:
                t.join(20)
            assert len(results) == 3 and len(loads) == 1 and c.info().reranker.loaded
            with pytest.raises(Unavailable, match="'gone' failed to load .*no REFRAG model at /nowhere"):
                list(c.answer("q?", passages=["a"]))
    finally:
        gate.set()
        running.stop()


def test_preload_keeps_health_not_serving_until_loaded(tmp_path, embedder, reranker, answerer):  # noqa: F811
    gate = threading.Event()

    def slow():
        gate.wait(20)
        return reranker

    gen = Generators(reranker=slow, answerer=lambda: answerer)
    running = serve(tmp_path, embedder, gen, preload_models=True)
    try:
        with running.client() as c:
            assert c.health("sieve.v1.RerankService") == "NOT_SERVING"
            gate.set()
            c.wait_until_serving(timeout=20, service="sieve.v1.RerankService")
            c.wait_until_serving(timeout=20, service="sieve.v1.AnswerService")
            assert c.info().answerer.loaded
    finally:
        gate.set()
        running.stop()


# -------------------------------------------------------------------------------------------------- the lane


def test_lane_runs_in_order_drops_expired_and_refuses_over_the_limit():
    async def go():
        lane = Lane("test", max_waiting=1)
        order = []
        release = threading.Event()

        def first():
            release.wait(5)
            order.append("first")

        running = asyncio.ensure_future(lane.run(first))
        await asyncio.sleep(0.05)
        expired = asyncio.ensure_future(lane.run(lambda: order.append("late"), deadline=time.monotonic() + 0.01))
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull, match="busy"):
            await lane.run(lambda: order.append("refused"))
        release.set()
        await running
        with pytest.raises(Expired, match="deadline"):
            await expired
        cancel = threading.Event()
        cancel.set()
        with pytest.raises(Expired, match="left"):
            await lane.run(lambda: order.append("gone"), cancel=cancel)
        result, waited = await lane.run(lambda: "ok")
        lane.close()
        return order, result, waited

    order, result, waited = asyncio.run(go())
    assert order == ["first"] and result == "ok" and waited >= 0
