"""Collection, Document and Search servicers: thin calls into `sieve.store` and `sieve.workers`.

The library calls are synchronous (SQLAlchemy, FAISS), so they run in threads; their errors (NotFound,
AlreadyExists, InvalidInput) reach the caller word for word through `errors.status_of`.
"""

from __future__ import annotations

import asyncio
from datetime import datetime

import grpc
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from sieve_client._proto import (
    collections_pb2,
    collections_pb2_grpc,
    common_pb2,
    documents_pb2,
    documents_pb2_grpc,
    search_pb2,
    search_pb2_grpc,
)

from .auth import current, require
from .errors import ServiceError, invalid, rpc, rpc_stream, unimplemented
from .generation import rerank_hits
from .interceptors import request_id
from .state import ServerState, deadline_of

METRICS = {0: "ip", 1: "ip", 2: "l2"}
METRIC_ENUM = {"ip": 1, "l2": 2}
INDEX_KINDS = {0: "flat", 1: "flat", 2: "hnsw", 3: "ivf-pq"}
INDEX_KIND_ENUM = {"flat": 1, "hnsw": 2, "ivf-pq": 3}
JOB_STATUS = {"pending": 1, "running": 2, "done": 3, "failed": 4}
DEFAULT_K = 10


def _store():
    from sieve.store import collections, session_scope

    return collections, session_scope


def _jobs():
    try:
        from sieve.workers import jobs
    except ImportError as e:
        raise unimplemented("indexing", f"the workers library is missing ({e})") from None
    return jobs


def _timestamp(value: datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def _struct(value: dict | None) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    if value:
        s.update(value)
    return s


def collection_message(coll, stats: dict) -> collections_pb2.Collection:
    by_status = {k: int(stats.get(k, 0)) for k in ("pending", "indexed", "failed")}
    return collections_pb2.Collection(
        name=coll.name, embedder=coll.embedder, dim=coll.dim, metric=METRIC_ENUM.get(coll.metric, 0),
        index_kind=INDEX_KIND_ENUM.get(coll.index_kind, 0), documents=int(stats.get("documents", 0)),
        chunks=int(stats.get("chunks", 0)), created_at=_timestamp(coll.created_at), documents_by_status=by_status)


def job_message(job) -> documents_pb2.Job:
    errors = [documents_pb2.JobError(document_id=str(e.get("external_id", "") or ""), line=int(e.get("line", 0) or 0),
                                     reason=str(e.get("reason", ""))) for e in job.errors or []]
    return documents_pb2.Job(id=job.id, kind=job.kind, status=JOB_STATUS.get(job.status, 0),
                             collection=job.collection or "", total=job.total, done=job.done, failed=job.failed,
                             errors=errors, created_at=_timestamp(job.created_at),
                             finished_at=_timestamp(job.finished_at))


def _need_name(value: str, field: str) -> str:
    if not value:
        raise invalid(field, "empty; name a collection")
    return value


class CollectionServicer(collections_pb2_grpc.CollectionServiceServicer):
    def __init__(self, state: ServerState):
        self.state = state

    def _describe(self, name: str) -> collections_pb2.Collection:
        collections, session_scope = _store()
        with session_scope(self.state.need_store("collections")) as s:
            coll = collections.get_collection(s, name)
            return collection_message(coll, collections.collection_stats(s, coll))

    @rpc
    async def CreateCollection(self, request, context):
        name = _need_name(request.name, "name")
        require("manage", name)
        engine = self.state.need_store("CreateCollection")
        if request.metric not in METRICS:
            raise invalid("metric", f"unknown value {request.metric}; use METRIC_IP or METRIC_L2")
        if request.index_kind not in INDEX_KINDS:
            raise invalid("index_kind", f"unknown value {request.index_kind}; use INDEX_KIND_FLAT, INDEX_KIND_HNSW "
                          "or INDEX_KIND_IVF_PQ")
        embedder_name = request.embedder or self.state.models.default
        embedder = await self.state.models.get(embedder_name, field="embedder")
        dim = embedder.dim
        if request.HasField("dim"):
            if not 1 <= request.dim <= embedder.dim:
                raise invalid("dim", f"must be between 1 and {embedder.dim} for embedder {embedder_name!r}, "
                              f"got {request.dim}")
            dim = request.dim

        def create():
            collections, session_scope = _store()
            with session_scope(engine) as s:
                coll = collections.create_collection(s, name, embedder=embedder_name, dim=dim,
                                                     metric=METRICS[request.metric],
                                                     index_kind=INDEX_KINDS[request.index_kind])
                return collection_message(coll, collections.collection_stats(s, coll))

        return collections_pb2.CreateCollectionResponse(collection=await asyncio.to_thread(create))

    @rpc
    async def ListCollections(self, request, context):
        engine = self.state.need_store("ListCollections")
        who = current.get()

        def list_all():
            collections, session_scope = _store()
            with session_scope(engine) as s:
                return [collection_message(c, collections.collection_stats(s, c))
                        for c in collections.list_collections(s) if who.sees(c.name)]

        return collections_pb2.ListCollectionsResponse(collections=await asyncio.to_thread(list_all))

    @rpc
    async def GetCollection(self, request, context):
        name = _need_name(request.name, "name")
        who = current.get()
        if not who.sees(name):
            require("search", name)  # raises PERMISSION_DENIED naming a scope that would do
        return collections_pb2.GetCollectionResponse(collection=await asyncio.to_thread(self._describe, name))

    @rpc
    async def DeleteCollection(self, request, context):
        name = _need_name(request.name, "name")
        require("manage", name)
        engine = self.state.need_store("DeleteCollection")
        jobs = _jobs()
        await asyncio.to_thread(jobs.drop_collection, engine, self.state.index_root, name)
        return collections_pb2.DeleteCollectionResponse()


class DocumentServicer(documents_pb2_grpc.DocumentServiceServicer):
    def __init__(self, state: ServerState):
        self.state = state

    @rpc
    async def Upsert(self, request, context):
        name = _need_name(request.collection, "collection")
        require("index", name)
        engine = self.state.need_store("Upsert")
        s = self.state.settings
        if not request.documents:
            raise invalid("documents", "empty; send at least one document")
        if len(request.documents) > s.max_documents_per_upsert:
            raise invalid("documents", f"{len(request.documents)} documents, over this server's limit of "
                          f"{s.max_documents_per_upsert} per call; split the call (the SDK does this for you)")
        jobs = _jobs()
        docs = []
        for i, d in enumerate(request.documents):
            if not d.id:
                raise invalid(f"documents[{i}].id", "empty; every document needs an id")
            docs.append(jobs.DocumentIn(external_id=d.id, text=d.text, metadata=json_format.MessageToDict(d.metadata)))
        job = await asyncio.to_thread(jobs.submit_upsert, engine, name, docs, batch_documents=s.batch_documents,
                                      fanout=s.worker_fanout)
        return documents_pb2.UpsertResponse(job=job_message(job))

    @rpc
    async def DeleteDocuments(self, request, context):
        name = _need_name(request.collection, "collection")
        require("index", name)
        engine = self.state.need_store("DeleteDocuments")
        if not request.ids:
            raise invalid("ids", "empty; name at least one document id")
        if any(not i for i in request.ids):
            raise invalid(f"ids[{list(request.ids).index('')}]", "empty document id")
        jobs = _jobs()
        job = await asyncio.to_thread(jobs.submit_delete, engine, name, list(request.ids),
                                      fanout=self.state.settings.worker_fanout)
        return documents_pb2.DeleteDocumentsResponse(job=job_message(job))

    async def _job(self, job_id: int):
        if job_id <= 0:
            raise invalid("id", "must be a job id (a positive number)")
        engine = self.state.need_store("jobs")
        job = await asyncio.to_thread(_jobs().get_job, engine, job_id)
        who = current.get()
        if not (who.admin or (job.collection and who.allows("index", job.collection))):
            raise ServiceError(grpc.StatusCode.PERMISSION_DENIED,
                               f"API key {who.name!r} may not see job {job_id}; it needs "
                               f"scope 'index:{job.collection}'")
        return job

    @rpc
    async def GetJob(self, request, context):
        return documents_pb2.GetJobResponse(job=job_message(await self._job(request.id)))

    @rpc_stream
    async def WatchJob(self, request, context):
        last = None
        poll = self.state.settings.job_poll_s
        while True:
            job = await self._job(request.id)
            seen = (job.status, job.done, job.failed, job.total)
            if seen != last:
                yield documents_pb2.WatchJobResponse(job=job_message(job))
                last = seen
            if job.status in ("done", "failed"):
                return
            await asyncio.sleep(poll)


class SearchServicer(search_pb2_grpc.SearchServiceServicer):
    def __init__(self, state: ServerState):
        self.state = state

    @rpc
    async def Search(self, request, context):
        name = _need_name(request.collection, "collection")
        require("search", name)
        self.state.need_store("Search")
        if not request.query.strip():
            raise invalid("query", "empty; send the text to search for")
        k = request.k or DEFAULT_K
        if k > self.state.settings.max_k:
            raise invalid("k", f"{k} is over this server's limit of {self.state.settings.max_k}")
        if request.rerank and k > self.state.settings.max_rerank_passages:
            raise invalid("k", f"{k} is over this server's limit of {self.state.settings.max_rerank_passages} "
                          "with rerank (the reranker ranks at most that many candidates)")
        filters = json_format.MessageToDict(request.filters) if request.HasField("filters") else None
        depth = max(k, min(self.state.settings.rerank_depth, self.state.settings.max_rerank_passages))
        hits, outcome = await self.state.retrieve(name, request.query, depth if request.rerank else k, filters,
                                                  timeout=deadline_of(context))
        tokens, queue_ns, inference_ns = outcome.tokens, outcome.queue_ns, outcome.inference_ns
        vector_scores = {h.chunk_id: float(h.score) for h in hits}
        reranker = ""
        if request.rerank and hits:
            ranked = await rerank_hits(self.state, request.query, hits, k, context)
            hits, reranker = ranked.hits, ranked.model
            tokens, queue_ns, inference_ns = tokens + ranked.tokens, queue_ns + ranked.queue_ns, \
                inference_ns + ranked.inference_ns
        return search_pb2.SearchResponse(
            hits=[search_pb2.Hit(chunk_id=h.chunk_id, document_id=h.external_id, text=h.text, score=float(h.score),
                                 metadata=_struct(h.metadata), ordinal=h.ordinal,
                                 vector_score=vector_scores[h.chunk_id]) for h in hits[:k]],
            reranker=reranker,
            metadata=common_pb2.Metadata(tokens=tokens, queue_time_ns=queue_ns, inference_time_ns=inference_ns,
                                         request_id=request_id.get()))

