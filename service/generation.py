"""Rerank, Answer and the reranking step of Search(rerank=true): the RPCs that run the backbone as a decoder.

Models. The reranker (Settings.reranker) and the REFRAG model (Settings.refrag) are loaded once each, in a thread,
by the first call that needs them (or at start with Settings.preload_models); they share one loaded backbone (the
REFRAG loader copies the decoder privately when it merges an adapter, the reranker loads its own when it has one).
Answer's block_size picks among more REFRAG models (Settings.refrag_block_models), one per block size, each loaded
by the first call that asks for its size (never preloaded) with its own decoder copy and lane.
A model that fails to load answers UNAVAILABLE with the reason, and the next call tries again.

Lanes. A decoder keeps its KV cache on the model object, so one model decodes one thing at a time: every call that
runs a decoder goes through that model's `Lane`, one worker thread taking jobs in arrival order (the event loop
never runs a model). When the lane is busy, at most `max_waiting_generations` calls wait; one more gets
RESOURCE_EXHAUSTED at once. A call whose deadline passed or whose caller left while it waited is dropped before it
reaches the model.

Answer streams. With `answer_batch` > 1 (SIEVE_ANSWER_BATCH, default 8) a model's Answer calls decode together:
its `BatchedDecoder` (refrag/batched.py) runs as short ticks posted to the lane (admit waiting calls, one step for
every row), so a new call waits for one step, not for the answers ahead of it, and Rerank jobs on the same decoder
run between ticks; each call reads its tokens on a reader thread. The decoder has its own limits (`answer_batch`
rows, `max_waiting_generations` waiting: Busy -> RESOURCE_EXHAUSTED; a deadline passed before a row: Expired).
With `answer_batch` 1, the lane's thread generates one call at a time. Either way each text piece goes to the
call's coroutine (a queue, through the event loop); when the caller goes away (cancel, deadline, disconnect) the
coroutine is cancelled and sets the stream's cancel event, which the decoder checks before every step: generation
stops within a token and the row or the lane is free for the next call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from google.protobuf import json_format
from sieve_client._proto import answer_pb2, answer_pb2_grpc, common_pb2, rerank_pb2, rerank_pb2_grpc

from .auth import require
from .errors import Expired, ModelLoading, QueueFull, ServiceError, invalid, rpc, rpc_stream, unimplemented
from .interceptors import request_id

log = logging.getLogger("sieve.service.generation")

# sieve.v1.RerankMode (None: the model's own)
MODES = {0: None, 1: "full", 2: "first", 3: "sliding", 4: "inline", 5: "likelihood"}
MODE_ENUM = {"full": 1, "first": 2, "sliding": 3, "inline": 4, "likelihood": 5}


# ------------------------------------------------------------------------------------------------------- lanes


class Lane:
    """One decoder's worker thread: jobs run one at a time, in order; a bounded number wait."""

    def __init__(self, name: str, max_waiting: int, metrics=None):
        self.name = name
        self.max_waiting = max_waiting
        self.metrics = metrics
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"sieve-{name}")
        self._lock = threading.Lock()
        self.waiting = 0  # submitted, not started
        self.busy = False  # a job is running

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.generation_waiting.labels(self.name).set(self.waiting)

    async def run(self, fn: Callable[[], object], *, deadline: float | None = None,
                  cancel: threading.Event | None = None) -> tuple[object, int]:
        """Run `fn()` on the lane's thread -> (its result, ns it waited for the lane). `deadline`: time.monotonic()
        after which the job is dropped unstarted (Expired); `cancel` set (the caller left): dropped too. If the
        awaiting coroutine is cancelled, `cancel` is set, so a job not yet started never starts."""
        cancel = cancel if cancel is not None else threading.Event()
        with self._lock:
            if (self.busy or self.waiting) and self.waiting >= self.max_waiting:
                if self.metrics is not None:
                    self.metrics.generation_rejected.labels(self.name).inc()
                raise QueueFull(f"the {self.name} decoder is busy and {self.waiting} call(s) already wait for it "
                                f"(limit {self.max_waiting}); retry with backoff")
            self.waiting += 1
            self._gauge()
        queued = time.perf_counter_ns()
        waited = [0]

        def job():
            with self._lock:
                self.waiting -= 1
                self.busy = True
                self._gauge()
            waited[0] = time.perf_counter_ns() - queued
            try:
                if cancel.is_set():
                    raise Expired("the caller left before the decoder was free")
                if deadline is not None and time.monotonic() >= deadline:
                    raise Expired(f"the deadline passed while waiting {waited[0] / 1e9:.1f} s for the busy "
                                  f"{self.name} decoder")
                return fn()
            finally:
                with self._lock:
                    self.busy = False

        future = asyncio.wrap_future(self._executor.submit(job))
        try:
            result = await asyncio.shield(future)
        except asyncio.CancelledError:
            cancel.set()
            future.add_done_callback(_retrieve)
            raise
        return result, waited[0]

    def post(self, fn: Callable[[], object]):
        """Queue `fn` on the lane's thread, behind what is queued, without admission (a batched decoder's tick)."""
        return self._executor.submit(fn)

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _retrieve(future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" warning


# ------------------------------------------------------------------------------------------------------ models


def refrag_block_sizes(default: str, more: str) -> tuple[int, dict[int, str]]:
    """(the default REFRAG model's k, or 0 when its folder cannot be read now: its first call says why;
    k -> name of each model in the comma-separated `more`, except one with the default's k: the default serves
    it). Read from the folders' configs, nothing loaded; a model `more` names that cannot be read, or two of them
    with one k, are configuration errors."""
    from sieve.refrag import RefragConfig, resolve_refrag

    try:
        default_k = RefragConfig.load(resolve_refrag(default)).k
    except (OSError, ValueError):
        default_k = 0
    by_k: dict[int, str] = {}
    for name in (n.strip() for n in more.split(",")):
        if not name or name == default:
            continue
        try:
            k = RefragConfig.load(resolve_refrag(name)).k
        except (OSError, ValueError) as e:
            raise ValueError(f"refrag_block_models names {name!r}: {e}") from None
        if k == default_k:
            log.info("REFRAG model %s is not served: the default model %s has its block size %d", name, default, k)
            continue
        if k in by_k:
            raise ValueError(f"refrag_block_models: {name!r} and {by_k[k]!r} both have block size {k}; "
                             "each block size is served by one model")
        by_k[k] = name
    return default_k, by_k


class _Slot:
    """One lazily loaded model."""

    def __init__(self, what: str, name: str, loader: Callable[[], object] | None):
        self.what, self.name, self.loader = what, name, loader
        self.model = None
        self.error: str | None = None
        self._loading: asyncio.Future | None = None

    async def get(self):
        if self.model is not None:
            return self.model
        if self.loader is None:
            raise unimplemented(self.what, "this server has no model configured for it")
        if self._loading is None:
            self._loading = asyncio.ensure_future(self._load())
        return await asyncio.shield(self._loading)

    async def _load(self):
        try:
            log.info("loading %s %s", self.what, self.name)
            t0 = time.perf_counter()
            model = await asyncio.to_thread(self.loader)
            self.model, self.error = model, None
            log.info("%s %s ready in %.1f s", self.what, self.name, time.perf_counter() - t0)
            return model
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"
            log.exception("%s %s failed to load", self.what, self.name)
            raise ModelLoading(f"{self.what} {self.name!r} failed to load ({e}); the server log has the details; "
                               "the next call tries again") from e
        finally:
            self._loading = None


class Generators:
    """The reranker and the REFRAG answerer of one server, each loaded on first need, and their decoders' lanes."""

    def __init__(self, *, reranker: Callable[[], object] | None, answerer: Callable[[], object] | None,
                 reranker_name: str = "sieve-rank", answerer_name: str = "refrag-k16", max_waiting: int = 8,
                 metrics=None, answerer_k: int = 0,
                 answerers_by_k: dict[int, tuple[str, Callable[[], object]]] | None = None, answer_batch: int = 1):
        """`answerer_k`: the default REFRAG model's block size (0: known once loaded); `answerers_by_k`: more REFRAG
        models, block size -> (name, loader), for Answer calls whose block_size asks for them; `answer_batch`: Answer
        streams of one model that decode together (1: one at a time, on its lane)."""
        self.rerank_slot = _Slot("reranker", reranker_name, reranker)
        self.answer_slot = _Slot("REFRAG model", answerer_name, answerer)
        self.answer_k = answerer_k
        self.block_slots = {k: _Slot("REFRAG model", name, loader) for k, (name, loader) in
                            sorted((answerers_by_k or {}).items())}
        self.max_waiting = max_waiting
        self.metrics = metrics
        self.answer_batch = answer_batch
        self._lanes: dict[int, tuple[object, Lane]] = {}
        # batched Answer calls read their tokens on these threads (the decoding runs on the model's lane)
        self.readers = ThreadPoolExecutor(4 * answer_batch + max_waiting, thread_name_prefix="sieve-answer-reader")

    @classmethod
    def from_settings(cls, settings, metrics=None) -> Generators:
        backbones: dict[str, object] = {}
        lock = threading.Lock()
        home = settings.home / "cache"

        def backbone(name: str):
            from sieve.backbone import load_backbone

            from sieve.registry import resolve_backbone

            with lock:  # one copy of the weights for both, however the two loads interleave
                if name not in backbones:
                    backbones[name] = load_backbone(resolve_backbone(name), home=home, device=settings.device,
                                                    dtype=settings.dtype)
                return backbones[name]

        def speed(model) -> None:
            from sieve.backbone.runtime import apply_speed_options

            with lock:  # the two loaders may share one decoder
                apply_speed_options(model, quant=settings.decode_quant, compile=settings.compile_decode,
                                    cache_dir=home / "aot", calibration_dir=home / "calibration",
                                    on_compile=log.info)

        def reranker():
            from sieve.reranker import RerankerConfig, load_reranker, resolve_reranker

            cfg = RerankerConfig.load(resolve_reranker(settings.reranker))
            shared = None if cfg.lora_r else backbone(cfg.backbone)  # an adapter is merged into its own copy
            out = load_reranker(settings.reranker, home=home, device=settings.device, dtype=settings.dtype,
                                backbone=shared)
            speed(out.backbone.model)
            return out

        def answerer(name: str) -> Callable[[], object]:
            def load():
                from sieve.refrag import Answerer, RefragConfig, load_refrag, resolve_refrag

                cfg = RefragConfig.load(resolve_refrag(name))
                refrag = load_refrag(name, home=home, device=settings.device, dtype=settings.dtype,
                                     backbone=backbone(cfg.backbone))
                speed(refrag.model)
                return Answerer(refrag, max_passages=settings.max_answer_passages)

            return load

        default_k, by_k = refrag_block_sizes(settings.refrag, settings.refrag_block_models)
        return cls(reranker=reranker, answerer=answerer(settings.refrag), reranker_name=settings.reranker,
                   answerer_name=settings.refrag, max_waiting=settings.max_waiting_generations, metrics=metrics,
                   answerer_k=default_k, answerers_by_k={k: (name, answerer(name)) for k, name in by_k.items()},
                   answer_batch=settings.answer_batch)

    @classmethod
    def preloaded(cls, *, reranker=None, answerer=None, more_answerers=(), max_waiting: int = 8,
                  metrics=None, answer_batch: int = 1) -> Generators:
        """Models already in memory (tests, benchmarks); a missing one answers UNIMPLEMENTED. `more_answerers`:
        Answerers for other block sizes (each by its model's k)."""
        more = {a.refrag.k: a for a in more_answerers}
        out = cls(reranker=(lambda: reranker) if reranker is not None else None,
                  answerer=(lambda: answerer) if answerer is not None else None,
                  reranker_name=getattr(reranker, "name", "reranker"),
                  answerer_name=getattr(getattr(answerer, "refrag", None), "name", "refrag"),
                  max_waiting=max_waiting, metrics=metrics,
                  answerer_k=answerer.refrag.k if answerer is not None else 0,
                  answerers_by_k={k: (a.refrag.name, lambda a=a: a) for k, a in more.items()},
                  answer_batch=answer_batch)
        out.rerank_slot.model, out.answer_slot.model = reranker, answerer
        for k, a in more.items():
            out.block_slots[k].model = a
        return out

    def lane(self, model) -> Lane:
        """The lane of a decoder model object (shared by everything that decodes with that object)."""
        key = id(model)
        if key not in self._lanes:
            self._lanes[key] = (model, Lane(f"decoder-{len(self._lanes)}", self.max_waiting, self.metrics))
        return self._lanes[key][1]

    async def reranker(self):
        """-> (Reranker, its lane), loading it if needed."""
        reranker = await self.rerank_slot.get()
        return reranker, self.lane(reranker.backbone.model)

    def answer_slots(self) -> list[tuple[int, _Slot]]:
        """(block size, slot) of every REFRAG model, the default first (its size 0 until known)."""
        default = self.answer_slot.model
        k = self.answer_k or (default.refrag.k if default is not None else 0)
        return [(k, self.answer_slot), *self.block_slots.items()] if self.answer_slot.loader is not None else []

    def answer_slot_for(self, block_size: int = 0) -> _Slot:
        """The slot of the REFRAG model trained for `block_size` (0: the default); INVALID_ARGUMENT when none is."""
        served = self.answer_slots()
        if block_size == 0 or not served:
            return self.answer_slot
        for k, slot in served:
            if k == block_size:
                return slot
        sizes = ", ".join(f"{k} ({slot.name})" for k, slot in served if k)
        raise invalid("block_size", f"{block_size}: no REFRAG model on this server was trained for it; it serves "
                      f"{sizes}; 0 takes the default")

    async def answerer(self, block_size: int = 0):
        """-> (Answerer, its lane) for `block_size` (0: the default model), loading it if needed."""
        answerer = await self.answer_slot_for(block_size).get()
        lane = self.lane(answerer.refrag.model)
        if self.answer_batch > 1 and answerer.decoder is None:  # its streams decode together, in ticks on the lane
            from sieve.refrag import BatchedDecoder

            answerer.decoder = BatchedDecoder(answerer.refrag.model, answerer.refrag.tokenizer.eos_ids,
                                              max_rows=self.answer_batch, max_waiting=self.max_waiting,
                                              submit=lane.post)
        return answerer, lane

    async def preload(self) -> bool:
        """Load both now; True if both loaded (failures are logged, and calls say why)."""
        ok = True
        for slot in (self.rerank_slot, self.answer_slot):
            if slot.loader is None:
                continue
            try:
                await slot.get()
            except Exception:
                ok = False
        return ok

    def close(self) -> None:
        for slot in (self.answer_slot, *self.block_slots.values()):
            decoder = getattr(slot.model, "decoder", None)
            if decoder is not None:  # its callers get an error, so no reader thread waits for tokens forever
                decoder.close()
        for _, lane in self._lanes.values():
            lane.close()
        self.readers.shutdown(wait=False, cancel_futures=True)


async def _read_batched(readers: ThreadPoolExecutor, generate: Callable[[], object]) -> tuple[object, int]:
    """Run `generate` on a reader thread -> (its stream, ns it waited for a row of the batched decoder); the
    decoder's refusals as the service's errors."""
    from sieve.refrag import Busy

    def read():
        try:
            return generate()
        except Busy as e:
            raise QueueFull(str(e)) from None
        except TimeoutError as e:
            raise Expired(str(e)) from None

    stream = await asyncio.wrap_future(readers.submit(read))
    return stream, int(stream.stats.queue_s * 1e9)


def _deadline(context) -> float | None:
    left = context.time_remaining()
    return None if left is None else time.monotonic() + max(0.0, left)


async def _within(coro, context):
    """Await a model load within the call's deadline."""
    left = context.time_remaining()
    return await (asyncio.wait_for(coro, left) if left is not None else coro)


def _metadata(tokens: int, queue_ns: int, inference_ns: int) -> common_pb2.Metadata:
    return common_pb2.Metadata(tokens=tokens, queue_time_ns=queue_ns, inference_time_ns=inference_ns,
                               request_id=request_id.get())


# ------------------------------------------------------------------------------------------------------ rerank


@dataclass
class Ranked:
    hits: list
    model: str
    tokens: int
    queue_ns: int
    inference_ns: int


async def _rank(state, query: str, passages: list[str], mode: str | None, top_k: int | None, context,
                fuse: bool | None = None):
    """mode / fuse None: the reranker's own defaults (its reranker.json)."""
    from sieve.reranker import PromptTooLong

    reranker, lane = await _within(state.generation.reranker(), context)
    try:
        result, waited = await lane.run(lambda: reranker.rank(query, passages, mode=mode, top_k=top_k, fuse=fuse),
                                        deadline=_deadline(context))
    except PromptTooLong as e:
        raise invalid("passages", str(e)) from None
    return reranker, result, waited


async def rerank_hits(state, query: str, hits: list, k: int, context) -> Ranked:
    """Search(rerank=true): order the candidates' chunk texts (in the index's order) with the reranker in its
    default mode and fusion; the best `k`, each with the reranker's score."""
    reranker, result, waited = await _rank(state, query, [h.text for h in hits], None, min(k, len(hits)), context)
    ranked = [dataclasses.replace(hits[i], score=float(score)) for i, score in zip(result.order, result.scores)]
    s = result.stats
    return Ranked(ranked, reranker.name, s.tokens_processed, waited, int(s.seconds * 1e9))


class RerankServicer(rerank_pb2_grpc.RerankServiceServicer):
    def __init__(self, state):
        self.state = state

    @rpc
    async def Rerank(self, request, context):
        require("rerank")
        if not request.query.strip():
            raise invalid("query", "empty; send the query the passages are ranked for")
        passages = list(request.passages)
        if not passages:
            raise invalid("passages", "empty; send at least one passage")
        limit = self.state.settings.max_rerank_passages
        if len(passages) > limit:
            raise invalid("passages", f"{len(passages)} passages, over this server's limit of {limit} per call; "
                          "rank the best candidates of a first stage, or split the list")
        if request.mode not in MODES:
            raise invalid("mode", f"unknown value {request.mode}; use RERANK_MODE_FULL, RERANK_MODE_FIRST, "
                          "RERANK_MODE_SLIDING, RERANK_MODE_INLINE or RERANK_MODE_LIKELIHOOD")
        mode = MODES[request.mode]
        top_k = min(request.top_k, len(passages)) if request.top_k else None
        fuse = request.fuse if request.HasField("fuse") else None
        reranker, result, waited = await _rank(self.state, request.query, passages, mode, top_k, context, fuse)
        s = result.stats
        ranks = [rerank_pb2.Rank(index=i, score=float(score), text=passages[i] if request.return_text else None)
                 for i, score in zip(result.order, result.scores)]
        return rerank_pb2.RerankResponse(ranks=ranks, model=reranker.name, mode=MODE_ENUM[result.mode],
                                         passage_cap=s.passage_cap, truncated=s.truncated, fused=result.fused,
                                         metadata=_metadata(s.tokens_processed, waited, int(s.seconds * 1e9)))


# ------------------------------------------------------------------------------------------------------ answer


_PASSAGE = re.compile(r"^passage (\d+) ")


def _answer_error(e: ValueError, context_field: str, sent: bool) -> ServiceError:
    """The library's ValueError -> INVALID_ARGUMENT naming the request field it is about."""
    message = str(e)
    m = _PASSAGE.match(message)
    if m and sent:
        return invalid(f"passages[{m.group(1)}]", message)
    if message.startswith("the question"):
        return invalid("question", message)
    if message.startswith("expansion"):
        return invalid("expansion", message)
    if message.startswith("this model has no learned policy"):
        return invalid("policy", message)
    return invalid(context_field, message)


def _precomputed(engine, hits: list, refrag) -> list:
    """The retrieved chunks as the answerer takes them: their block encodings stored at index time when they match
    this model (encoder, tokenizer, k), else their text (encoded now)."""
    from sieve.refrag import EncodedPassage
    from sieve.store import session_scope
    from sieve.store.blocks import fetch_blocks

    with session_scope(engine) as s:
        records = fetch_blocks(s, [h.chunk_id for h in hits], refrag.k)
    out: list = []
    for h in hits:
        record = records.get(h.chunk_id)
        if record is not None and record["encoder"] == refrag.blocks.fingerprint:
            try:
                out.append(EncodedPassage.from_record(record, h.text, refrag.tokenizer))
                continue
            except ValueError:  # made with another tokenizer: encode the text instead
                pass
        out.append(h.text)
    return out


_END = object()


class AnswerServicer(answer_pb2_grpc.AnswerServiceServicer):
    def __init__(self, state):
        self.state = state

    def _check(self, request) -> tuple[int, float, float, str]:
        s = self.state.settings
        if not request.question.strip():
            raise invalid("question", "empty; send the question to answer")
        if request.collection and request.passages:
            raise invalid("passages", "send either a collection to retrieve from or passages, not both")
        if not request.collection and not request.passages:
            raise invalid("collection", "set a collection to retrieve from, or send passages")
        if len(request.passages) > s.max_answer_passages:
            raise invalid("passages", f"{len(request.passages)} passages, over this server's limit of "
                          f"{s.max_answer_passages} per call")
        for i, p in enumerate(request.passages):
            if not p.strip():
                raise invalid(f"passages[{i}]", "empty; every passage needs text")
        if request.collection and request.k > s.max_answer_passages:
            raise invalid("k", f"{request.k} is over this server's limit of {s.max_answer_passages} passages")
        max_new = request.max_new_tokens or s.answer_max_new_tokens
        if max_new > s.max_new_tokens:
            raise invalid("max_new_tokens", f"{max_new} is over this server's limit of {s.max_new_tokens}")
        if not math.isfinite(request.temperature) or request.temperature < 0:
            raise invalid("temperature", f"must be 0 (greedy) or more, got {request.temperature}")
        expansion = float(request.expansion) if request.HasField("expansion") else None  # None: the model's default
        if expansion is not None and not (math.isfinite(expansion) and 0.0 <= expansion <= 1.0):
            raise invalid("expansion", f"must be a fraction between 0 and 1, got {expansion}")
        from sieve.refrag.policy import check_policy

        try:
            policy = check_policy(request.policy) if request.policy else None  # None: the model's default
        except ValueError as e:
            raise invalid("policy", str(e)) from None
        return max_new, float(request.temperature), expansion, policy

    @rpc_stream
    async def Answer(self, request, context):
        if request.collection:
            require("search", request.collection)
        else:
            require("answer")
        max_new, temperature, expansion, policy = self._check(request)
        t0 = time.perf_counter_ns()
        state = self.state
        answerer, lane = await _within(state.generation.answerer(request.block_size), context)
        refrag = answerer.refrag
        tokens = queue_ns = inference_ns = 0
        precomputed = 0
        if request.collection:
            filters = json_format.MessageToDict(request.filters) if request.HasField("filters") else None
            hits, outcome = await state.retrieve(request.collection, request.question,
                                                 request.k or state.settings.answer_k, filters,
                                                 timeout=context.time_remaining(), field="question")
            hits = [h for h in hits if h.text.strip()]
            if not hits:
                raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"collection {request.collection!r} has no indexed passages"
                                   + (" matching the filters" if filters else "") + " to answer from")
            tokens, queue_ns, inference_ns = outcome.tokens, outcome.queue_ns, outcome.inference_ns
            passages = await asyncio.to_thread(_precomputed, state.need_store("Answer"), hits, refrag)
            precomputed = sum(not isinstance(p, str) for p in passages)
            cite = lambda i: answer_pb2.Citation(chunk_id=hits[i].chunk_id, document_id=hits[i].external_id,
                                                 score=float(hits[i].score), index=i, text=hits[i].text)
            context_field = "k"
        else:
            passages = list(request.passages)
            cite = lambda i: answer_pb2.Citation(index=i)
            context_field = "passages"

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(pieces.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): stop generating
                cancel.set()

        deadline = _deadline(context)

        def generate():
            stream = answerer.stream(request.question, passages, expansion=expansion, policy=policy,
                                     max_new_tokens=max_new, temperature=temperature, cancel=cancel,
                                     deadline=deadline)
            put(("start", stream))
            try:
                for piece in stream:
                    put(("piece", piece))
            finally:
                stream.close()
            return stream

        if answerer.decoder is not None:  # decoding runs in the batched decoder's ticks; this thread reads
            runner = asyncio.ensure_future(_read_batched(state.generation.readers, generate))
        else:
            runner = asyncio.ensure_future(lane.run(generate, deadline=deadline, cancel=cancel))
        runner.add_done_callback(lambda _: pieces.put_nowait((_END, None)))
        first_ns = None
        try:
            while True:
                kind, value = await pieces.get()
                if kind == "start":
                    yield answer_pb2.AnswerResponse(citations=[cite(i) for i in value.passages])
                elif kind == "piece":
                    if first_ns is None:
                        first_ns = time.perf_counter_ns() - t0
                    yield answer_pb2.AnswerResponse(text=value)
                else:
                    break
            try:
                stream, waited = runner.result()
            except ValueError as e:
                raise _answer_error(e, context_field, not request.collection) from None
            st = stream.stats
            usage = answer_pb2.AnswerUsage(
                prompt_positions=st.prompt_positions, full_prompt_tokens=st.full_prompt_tokens, blocks=st.blocks,
                expanded_blocks=st.expanded, generated_tokens=st.generated_tokens,
                precomputed_passages=precomputed, time_to_first_token_ns=first_ns or 0, model=refrag.name,
                block_size=refrag.k)
            yield answer_pb2.AnswerResponse(
                finish_reason=st.stopped, usage=usage,
                metadata=_metadata(tokens + st.prompt_positions + st.generated_tokens, queue_ns + waited,
                                   inference_ns + int(st.seconds * 1e9)))
        finally:
            cancel.set()  # the caller left (or the answer is complete): the decoder stops before its next step
            if not runner.done():
                runner.add_done_callback(_retrieve)


__all__ = ["AnswerServicer", "Generators", "Lane", "RerankServicer", "rerank_hits"]
