"""`SieveClient`: the blocking SDK. Every method maps to one RPC (or a few, for a huge embed call)."""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from . import _convert as cv
from ._channel import (
    DEFAULT_MAX_MESSAGE,
    DEFAULT_TARGET,
    HEALTH_CHECK,
    RetryPolicy,
    call_metadata,
    channel_args,
    credentials,
    health_request,
    health_status,
)
from ._proto import (
    answer_pb2_grpc,
    collections_pb2,
    collections_pb2_grpc,
    documents_pb2,
    documents_pb2_grpc,
    embed_pb2,
    embed_pb2_grpc,
    info_pb2,
    info_pb2_grpc,
    rerank_pb2_grpc,
    search_pb2_grpc,
)
from .answers import AnswerStream
from .errors import RETRYABLE, from_rpc_error
from .results import Collection, Document, EmbedResult, Hit, Job, RerankResult, ServerInfo, Tokens

FALLBACK_MAX_TEXTS = 256


class SieveClient:
    """A connection to one Sieve server.

    target: "host:port". api_key: sent as `authorization: Bearer <key>`. tls: use TLS (system roots, or
    `root_certificates` = PEM bytes or a path); client_cert / client_key for mutual TLS. timeout: default seconds
    per call (retries included). retry: backoff on UNAVAILABLE / RESOURCE_EXHAUSTED. embed_parallelism: calls in
    flight when one big `embed` is split.
    """

    def __init__(self, target: str = DEFAULT_TARGET, *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | None = None, client_cert: bytes | str | None = None,
                 client_key: bytes | str | None = None, timeout: float = 30.0, retry: RetryPolicy | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE, embed_parallelism: int = 4,
                 channel: grpc.Channel | None = None):
        creds = credentials(tls, root_certificates, client_cert, client_key)
        options = channel_args(max_message_bytes)
        if channel is None:
            channel = (grpc.secure_channel(target, creds, options) if creds is not None
                       else grpc.insecure_channel(target, options))
        self.channel = channel
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.max_message_bytes = max_message_bytes
        self.embed_parallelism = embed_parallelism
        self._metadata = call_metadata(api_key)
        self._info = info_pb2_grpc.InfoServiceStub(channel)
        self._embed = embed_pb2_grpc.EmbedServiceStub(channel)
        self._collections = collections_pb2_grpc.CollectionServiceStub(channel)
        self._documents = documents_pb2_grpc.DocumentServiceStub(channel)
        self._search = search_pb2_grpc.SearchServiceStub(channel)
        self._rerank = rerank_pb2_grpc.RerankServiceStub(channel)
        self._answer = answer_pb2_grpc.AnswerServiceStub(channel)
        self._health = channel.unary_unary(HEALTH_CHECK)  # raw bytes in and out
        self._limits: dict[str, int] | None = None

    # -- plumbing ----------------------------------------------------------------------------------------------

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> SieveClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method, request, timeout: float | None = None):
        """One unary call with retries on UNAVAILABLE / RESOURCE_EXHAUSTED, all within `timeout`."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return method(request, timeout=max(0.001, deadline - time.monotonic()), metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() in RETRYABLE and attempt < self.retry.attempts:
                    pause = self.retry.delay(attempt)
                    if time.monotonic() + pause < deadline:
                        time.sleep(pause)
                        continue
                raise from_rpc_error(e) from None

    def _stream(self, responses: Iterator) -> Iterator:
        try:
            yield from responses
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    def limits(self) -> dict[str, int]:
        """The server's limits (from Info, asked once; {} if the server cannot say)."""
        if self._limits is None:
            try:
                self._limits = self.info().limits
            except Exception:  # an old or unreachable server: the embed call itself will say what is wrong
                return {}
        return self._limits

    # -- info and health ---------------------------------------------------------------------------------------

    def info(self, *, timeout: float | None = None) -> ServerInfo:
        return cv.server_info(self._call(self._info.Info, info_pb2.InfoRequest(), timeout))

    def health(self, service: str = "", *, timeout: float = 5.0) -> str:
        """SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN (grpc.health.v1), e.g. service="sieve.v1.EmbedService"."""
        try:
            return health_status(self._health(health_request(service), timeout=timeout))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise from_rpc_error(e) from None

    def wait_until_serving(self, timeout: float = 60.0, service: str = "") -> None:
        """Block until health says SERVING (the server is up and its default model loaded)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.health(service, timeout=min(5.0, max(0.1, deadline - time.monotonic()))) == "SERVING":
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} was not SERVING within {timeout:.0f} s")
            time.sleep(0.1)

    # -- embeddings ----------------------------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], *, model: str | None = None, instruction: str | None = None,
              query: bool = False, pooling: str | None = None, dim: int | None = None, precision: str = "float32",
              truncate: bool = True, normalize: bool = True, timeout: float | None = None) -> EmbedResult:
        """Embed `texts`, in order. A list over the server's per-call limit is split into several calls (run
        `embed_parallelism` at a time) and joined back."""
        texts = cv.texts_of(texts)
        options = cv.embed_options(model=model, instruction=instruction, query=query, pooling=pooling, dim=dim,
                                   precision=precision, truncate=truncate, normalize=normalize)
        parts = self._parts(texts)

        def one(part: list[str]):
            return self._call(self._embed.Embed, embed_pb2.EmbedRequest(texts=part, options=options), timeout)

        if len(parts) == 1:
            responses = [one(parts[0])]
        else:
            with ThreadPoolExecutor(self.embed_parallelism) as pool:
                responses = list(pool.map(one, parts))
        return cv.embed_result(responses, model or "", precision)

    def _parts(self, texts: list[str]) -> list[list[str]]:
        limits = self.limits()
        max_bytes = min(self.max_message_bytes, limits.get("max_message_bytes") or self.max_message_bytes) // 2
        return cv.chunks(texts, limits.get("max_texts_per_request") or FALLBACK_MAX_TEXTS, max_bytes) or [[]]

    def embed_stream(self, batches: Iterable[Sequence[str]], *, model: str | None = None,
                     instruction: str | None = None, query: bool = False, pooling: str | None = None,
                     dim: int | None = None, precision: str = "float32", truncate: bool = True,
                     normalize: bool = True, timeout: float | None = None) -> Iterator[EmbedResult]:
        """One EmbedStream: each batch of texts in, one EmbedResult out, in order. The server waits for queue room
        instead of refusing, so this is the way to push a long sequence of batches."""
        options = cv.embed_options(model=model, instruction=instruction, query=query, pooling=pooling, dim=dim,
                                   precision=precision, truncate=truncate, normalize=normalize)

        def requests():
            for n, batch in enumerate(batches):
                yield embed_pb2.EmbedStreamRequest(texts=cv.texts_of(batch), options=options if n == 0 else None)

        responses = self._embed.EmbedStream(requests(), timeout=timeout, metadata=self._metadata)
        for r in self._stream(responses):
            yield cv.embed_result([r], model or "", precision)

    def tokenize(self, texts: Sequence[str], *, model: str | None = None, instruction: str | None = None,
                 query: bool = False, truncate: bool = True, timeout: float | None = None) -> list[Tokens]:
        request = embed_pb2.TokenizeRequest(texts=cv.texts_of(texts), model=model or "", query=query,
                                            truncate=truncate)
        if instruction is not None:
            request.instruction = instruction
        return cv.tokens(self._call(self._embed.Tokenize, request, timeout))

    # -- collections -----------------------------------------------------------------------------------------

    def create_collection(self, name: str, *, embedder: str | None = None, dim: int | None = None,
                          metric: str = "ip", index_kind: str = "flat", timeout: float | None = None) -> Collection:
        request = cv.create_collection_request(name, embedder=embedder, dim=dim, metric=metric, index_kind=index_kind)
        return cv.collection(self._call(self._collections.CreateCollection, request, timeout).collection)

    def list_collections(self, *, timeout: float | None = None) -> list[Collection]:
        r = self._call(self._collections.ListCollections, collections_pb2.ListCollectionsRequest(), timeout)
        return [cv.collection(c) for c in r.collections]

    def get_collection(self, name: str, *, timeout: float | None = None) -> Collection:
        r = self._call(self._collections.GetCollection, collections_pb2.GetCollectionRequest(name=name), timeout)
        return cv.collection(r.collection)

    def delete_collection(self, name: str, *, timeout: float | None = None) -> None:
        self._call(self._collections.DeleteCollection, collections_pb2.DeleteCollectionRequest(name=name), timeout)

    # -- documents and jobs ----------------------------------------------------------------------------------

    def upsert(self, collection: str, documents: Iterable[Document | Mapping[str, Any] | tuple], *,
               timeout: float | None = None) -> Job:
        """Insert or replace documents (Document, {"id", "text", "metadata"} or (id, text[, metadata])); returns
        the indexing job at once. Follow it with `watch_job` / `wait_job`."""
        request = documents_pb2.UpsertRequest(collection=collection, documents=[cv.document(d) for d in documents])
        return cv.job(self._call(self._documents.Upsert, request, timeout).job)

    def delete_documents(self, collection: str, ids: Iterable[str], *, timeout: float | None = None) -> Job:
        request = documents_pb2.DeleteDocumentsRequest(collection=collection, ids=list(ids))
        return cv.job(self._call(self._documents.DeleteDocuments, request, timeout).job)

    def get_job(self, job_id: int, *, timeout: float | None = None) -> Job:
        return cv.job(self._call(self._documents.GetJob, documents_pb2.GetJobRequest(id=job_id), timeout).job)

    def watch_job(self, job_id: int, *, timeout: float | None = None) -> Iterator[Job]:
        """The job now, then each time its progress changes, until done or failed. Reconnects (with backoff) if
        the server becomes unavailable meanwhile."""
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        attempt = 0
        while True:
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                for r in self._documents.WatchJob(documents_pb2.WatchJobRequest(id=job_id), timeout=left,
                                                  metadata=self._metadata):
                    attempt = 0
                    job = cv.job(r.job)
                    if job != last:
                        yield job
                        last = job
                return
            except grpc.RpcError as e:
                attempt += 1
                if e.code() in RETRYABLE and attempt < self.retry.attempts:
                    time.sleep(self.retry.delay(attempt))
                    continue
                raise from_rpc_error(e) from None

    def wait_job(self, job_id: int, *, timeout: float | None = None) -> Job:
        """Block until the job is done or failed; returns its final state."""
        last = None
        for job in self.watch_job(job_id, timeout=timeout):
            last = job
        return last

    # -- search, rerank, answer ------------------------------------------------------------------------------

    def search(self, collection: str, query: str, *, k: int = 10, filters: Mapping[str, Any] | None = None,
               rerank: bool = False, timeout: float | None = None) -> list[Hit]:
        return cv.hits(self._call(self._search.Search, cv.search_request(collection, query, k, filters, rerank),
                                  timeout))

    def rerank(self, query: str, passages: Sequence[str], *, mode: str | None = None, top_k: int | None = None,
               fuse: bool | None = None, return_text: bool = False, timeout: float | None = None) -> RerankResult:
        """Rank `passages` by relevance to `query`: "full" ranks the whole list in one pass (always a valid
        permutation; scores n - position), "first" by first-token logits (one forward; scores are log-probs),
        "inline" by scores read at each passage's end (one forward), "likelihood" by log p(query | passage) (query
        likelihood, zero-shot; scores are log-probs), "sliding" with the sliding-window baseline;
        None: the served reranker's default (`Info`'s model card). `fuse`: fuse that order with the order sent
        (reciprocal rank fusion; send the passages best first, as a first stage ranked them; None: the reranker's
        default). `top_k`: only the best k (full mode also decodes only k ids). Iterate the result for `Rank`s,
        best first, or take `.order`."""
        r = self._call(self._rerank.Rerank, cv.rerank_request(query, passages, mode, top_k, return_text, fuse),
                       timeout)
        return cv.rerank_result(r)

    def answer(self, question: str, *, collection: str | None = None, passages: Sequence[str] = (), k: int = 0,
               max_new_tokens: int = 0, temperature: float = 0.0, expansion: float | None = None,
               filters: Mapping[str, Any] | None = None, policy: str = "", block_size: int = 0,
               timeout: float | None = None) -> AnswerStream:
        """Answer `question` from the top `k` chunks of `collection` (Search with the question, `filters` on
        metadata), or from `passages` sent now, with REFRAG compressed decoding. Returns at once; iterate the
        stream for the text pieces as they are generated (`.citations`, `.usage`, `.finish_reason` fill in as it
        goes; `.cancel()` stops the server). `expansion`: fraction of context blocks fed as full tokens (0..1; 0
        compresses every block), chosen by `policy` ("similarity", "recency", "learned"); None / "": the served
        model's defaults (shipped models: 0.25 by similarity); `block_size`: decoder tokens per compressed block,
        answered by the served model trained for it (`info().answerers`); 0 values: the server's defaults.
        No retries: a stream is not replayed."""
        request = cv.answer_request(question, collection, passages, k, max_new_tokens, temperature, expansion,
                                    filters, policy, block_size)
        return AnswerStream(self._answer.Answer(request, timeout=timeout, metadata=self._metadata))
