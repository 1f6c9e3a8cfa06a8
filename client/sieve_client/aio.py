"""`AsyncSieveClient`: the asyncio SDK, method for method the same as `SieveClient`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any

import grpc
from grpc import aio

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
from .answers import AsyncAnswerStream
from .client import FALLBACK_MAX_TEXTS
from .errors import RETRYABLE, from_rpc_error
from .results import Collection, Document, EmbedResult, Hit, Job, RerankResult, ServerInfo, Tokens


class AsyncSieveClient:
    """See `SieveClient` for the options. Use `async with AsyncSieveClient(...) as client:` or `await close()`."""

    def __init__(self, target: str = DEFAULT_TARGET, *, api_key: str | None = None, tls: bool = False,
                 root_certificates: bytes | str | None = None, client_cert: bytes | str | None = None,
                 client_key: bytes | str | None = None, timeout: float = 30.0, retry: RetryPolicy | None = None,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE, embed_parallelism: int = 4,
                 channel: aio.Channel | None = None):
        creds = credentials(tls, root_certificates, client_cert, client_key)
        options = channel_args(max_message_bytes)
        if channel is None:
            channel = (aio.secure_channel(target, creds, options) if creds is not None
                       else aio.insecure_channel(target, options))
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
        self._health = channel.unary_unary(HEALTH_CHECK)
        self._limits: dict[str, int] | None = None

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncSieveClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _call(self, method, request, timeout: float | None = None):
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return await method(request, timeout=max(0.001, deadline - time.monotonic()),
                                    metadata=self._metadata)
            except grpc.RpcError as e:
                if e.code() in RETRYABLE and attempt < self.retry.attempts:
                    pause = self.retry.delay(attempt)
                    if time.monotonic() + pause < deadline:
                        await asyncio.sleep(pause)
                        continue
                raise from_rpc_error(e) from None

    async def limits(self) -> dict[str, int]:
        if self._limits is None:
            try:
                self._limits = (await self.info()).limits
            except Exception:
                return {}
        return self._limits

    async def info(self, *, timeout: float | None = None) -> ServerInfo:
        return cv.server_info(await self._call(self._info.Info, info_pb2.InfoRequest(), timeout))

    async def health(self, service: str = "", *, timeout: float = 5.0) -> str:
        try:
            return health_status(await self._health(health_request(service), timeout=timeout))
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return "SERVICE_UNKNOWN"
            raise from_rpc_error(e) from None

    async def wait_until_serving(self, timeout: float = 60.0, service: str = "") -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.health(service, timeout=min(5.0, max(0.1, deadline - time.monotonic()))) == "SERVING":
                    return
            except Exception:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.target} was not SERVING within {timeout:.0f} s")
            await asyncio.sleep(0.1)

    async def embed(self, texts: Sequence[str], *, model: str | None = None, instruction: str | None = None,
                    query: bool = False, pooling: str | None = None, dim: int | None = None,
                    precision: str = "float32", truncate: bool = True, normalize: bool = True,
                    timeout: float | None = None) -> EmbedResult:
        texts = cv.texts_of(texts)
        options = cv.embed_options(model=model, instruction=instruction, query=query, pooling=pooling, dim=dim,
                                   precision=precision, truncate=truncate, normalize=normalize)
        limits = await self.limits()
        max_bytes = min(self.max_message_bytes, limits.get("max_message_bytes") or self.max_message_bytes) // 2
        parts = cv.chunks(texts, limits.get("max_texts_per_request") or FALLBACK_MAX_TEXTS, max_bytes) or [[]]
        gate = asyncio.Semaphore(self.embed_parallelism)

        async def one(part: list[str]):
            async with gate:
                return await self._call(self._embed.Embed, embed_pb2.EmbedRequest(texts=part, options=options),
                                        timeout)

        responses = await asyncio.gather(*(one(p) for p in parts))
        return cv.embed_result(list(responses), model or "", precision)

    async def embed_stream(self, batches: Iterable[Sequence[str]], *, model: str | None = None,
                           instruction: str | None = None, query: bool = False, pooling: str | None = None,
                           dim: int | None = None, precision: str = "float32", truncate: bool = True,
                           normalize: bool = True, timeout: float | None = None) -> AsyncIterator[EmbedResult]:
        options = cv.embed_options(model=model, instruction=instruction, query=query, pooling=pooling, dim=dim,
                                   precision=precision, truncate=truncate, normalize=normalize)

        def requests():
            for n, batch in enumerate(batches):
                yield embed_pb2.EmbedStreamRequest(texts=cv.texts_of(batch), options=options if n == 0 else None)

        call = self._embed.EmbedStream(requests(), timeout=timeout, metadata=self._metadata)
        try:
            async for r in call:
                yield cv.embed_result([r], model or "", precision)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None

    async def tokenize(self, texts: Sequence[str], *, model: str | None = None, instruction: str | None = None,
                       query: bool = False, truncate: bool = True, timeout: float | None = None) -> list[Tokens]:
        request = embed_pb2.TokenizeRequest(texts=cv.texts_of(texts), model=model or "", query=query,
                                            truncate=truncate)
        if instruction is not None:
            request.instruction = instruction
        return cv.tokens(await self._call(self._embed.Tokenize, request, timeout))

    async def create_collection(self, name: str, *, embedder: str | None = None, dim: int | None = None,
                                metric: str = "ip", index_kind: str = "flat",
                                timeout: float | None = None) -> Collection:
        request = cv.create_collection_request(name, embedder=embedder, dim=dim, metric=metric, index_kind=index_kind)
        return cv.collection((await self._call(self._collections.CreateCollection, request, timeout)).collection)

    async def list_collections(self, *, timeout: float | None = None) -> list[Collection]:
        r = await self._call(self._collections.ListCollections, collections_pb2.ListCollectionsRequest(), timeout)
        return [cv.collection(c) for c in r.collections]

    async def get_collection(self, name: str, *, timeout: float | None = None) -> Collection:
        r = await self._call(self._collections.GetCollection, collections_pb2.GetCollectionRequest(name=name),
                             timeout)
        return cv.collection(r.collection)

    async def delete_collection(self, name: str, *, timeout: float | None = None) -> None:
        await self._call(self._collections.DeleteCollection, collections_pb2.DeleteCollectionRequest(name=name),
                         timeout)

    async def upsert(self, collection: str, documents: Iterable[Document | Mapping[str, Any] | tuple], *,
                     timeout: float | None = None) -> Job:
        request = documents_pb2.UpsertRequest(collection=collection, documents=[cv.document(d) for d in documents])
        return cv.job((await self._call(self._documents.Upsert, request, timeout)).job)

    async def delete_documents(self, collection: str, ids: Iterable[str], *, timeout: float | None = None) -> Job:
        request = documents_pb2.DeleteDocumentsRequest(collection=collection, ids=list(ids))
        return cv.job((await self._call(self._documents.DeleteDocuments, request, timeout)).job)

    async def get_job(self, job_id: int, *, timeout: float | None = None) -> Job:
        return cv.job((await self._call(self._documents.GetJob, documents_pb2.GetJobRequest(id=job_id),
                                        timeout)).job)

    async def watch_job(self, job_id: int, *, timeout: float | None = None) -> AsyncIterator[Job]:
        deadline = None if timeout is None else time.monotonic() + timeout
        last = None
        attempt = 0
        while True:
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            try:
                async for r in self._documents.WatchJob(documents_pb2.WatchJobRequest(id=job_id), timeout=left,
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
                    await asyncio.sleep(self.retry.delay(attempt))
                    continue
                raise from_rpc_error(e) from None

    async def wait_job(self, job_id: int, *, timeout: float | None = None) -> Job:
        last = None
        async for job in self.watch_job(job_id, timeout=timeout):
            last = job
        return last

    async def search(self, collection: str, query: str, *, k: int = 10, filters: Mapping[str, Any] | None = None,
                     rerank: bool = False, timeout: float | None = None) -> list[Hit]:
        request = cv.search_request(collection, query, k, filters, rerank)
        return cv.hits(await self._call(self._search.Search, request, timeout))

    async def rerank(self, query: str, passages: Sequence[str], *, mode: str | None = None,
                     top_k: int | None = None, fuse: bool | None = None, return_text: bool = False,
                     timeout: float | None = None) -> RerankResult:
        """Rank `passages` by relevance to `query`: mode "full", "first", "inline", "likelihood" or "sliding"
        (None: the served reranker's default); `fuse`: fuse with the order sent (RRF); `top_k`: only the best k. See
        `SieveClient.rerank`."""
        r = await self._call(self._rerank.Rerank,
                             cv.rerank_request(query, passages, mode, top_k, return_text, fuse), timeout)
        return cv.rerank_result(r)

    def answer(self, question: str, *, collection: str | None = None, passages: Sequence[str] = (), k: int = 0,
               max_new_tokens: int = 0, temperature: float = 0.0, expansion: float | None = None,
               filters: Mapping[str, Any] | None = None, policy: str = "", block_size: int = 0,
               timeout: float | None = None) -> AsyncAnswerStream:
        """`async for piece in client.answer(...)`: see `SieveClient.answer`."""
        request = cv.answer_request(question, collection, passages, k, max_new_tokens, temperature, expansion,
                                    filters, policy, block_size)
        return AsyncAnswerStream(self._answer.Answer(request, timeout=timeout, metadata=self._metadata))
