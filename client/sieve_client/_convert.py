"""Requests from Python values and results from messages: shared by the sync and the async client."""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping
from typing import Any

from google.protobuf import json_format, struct_pb2

from ._proto import answer_pb2, collections_pb2, documents_pb2, embed_pb2, info_pb2, rerank_pb2, search_pb2
from .results import (
    INDEX_KINDS,
    JOB_STATUSES,
    METRICS,
    POOLINGS,
    PRECISIONS,
    Collection,
    Document,
    EmbedResult,
    GenerationModel,
    Hit,
    Job,
    JobError,
    ModelInfo,
    Rank,
    RerankResult,
    ServerInfo,
    Tokens,
)

_METRIC_NAMES = {v: k for k, v in METRICS.items()} | {0: "ip"}
_KIND_NAMES = {v: k for k, v in INDEX_KINDS.items()} | {0: "flat"}
_PRECISION_NAMES = {v: k for k, v in PRECISIONS.items()} | {0: "float32"}


def _choice(value: str | None, table: dict[str, int], what: str) -> int:
    if value is None:
        return 0
    if value not in table:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(table)}")
    return table[value]


def embed_options(*, model: str | None = None, instruction: str | None = None, query: bool = False,
                  pooling: str | None = None, dim: int | None = None, precision: str = "float32",
                  truncate: bool = True, normalize: bool = True) -> embed_pb2.EmbedOptions:
    options = embed_pb2.EmbedOptions(model=model or "", query=query, pooling=_choice(pooling, POOLINGS, "pooling"),
                                     precision=_choice(precision, PRECISIONS, "precision"), truncate=truncate,
                                     normalize=normalize)
    if instruction is not None:
        options.instruction = instruction
    if dim is not None:
        options.dim = dim
    return options


def texts_of(texts: Iterable[str]) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("pass a list of texts; wrap a single text in a list")
    return list(texts)


def chunks(texts: list[str], max_texts: int, max_bytes: int) -> list[list[str]]:
    """Split a big embed call into calls of at most `max_texts` texts and about `max_bytes` of text."""
    out: list[list[str]] = []
    current: list[str] = []
    size = 0
    for text in texts:
        n = len(text.encode("utf-8")) + 8
        if current and (len(current) >= max_texts or size + n > max_bytes):
            out.append(current)
            current, size = [], 0
        current.append(text)
        size += n
    if current:
        out.append(current)
    return out


def vectors(embeddings, precision: str) -> list:
    if precision == "int8":
        return [array("b", e.int8).tolist() for e in embeddings]
    if precision == "binary":
        return [bytes(e.binary) for e in embeddings]
    return [list(e.float32.values) for e in embeddings]


def embed_result(responses: list, model: str, precision: str) -> EmbedResult:
    """One result from the responses of one or more Embed calls (in order)."""
    out: list = []
    dim, tokens, ids = 0, 0, []
    for r in responses:
        out.extend(vectors(r.embeddings, precision))
        dim = r.dim
        tokens += r.metadata.tokens
        ids.append(r.metadata.request_id)
        model = getattr(r, "model", "") or model
    return EmbedResult(out, model, dim, precision, tokens, ids)


def tokens(response) -> list[Tokens]:
    return [Tokens(list(t.ids), list(t.pieces), t.instruction_tokens) for t in response.tokens]


def server_info(r: info_pb2.InfoResponse) -> ServerInfo:
    models = [ModelInfo(m.name, m.dim, m.max_length, m.default_pooling, m.query_instruction, m.document_instruction,
                        m.loaded, m.int8_calibrated) for m in r.models]
    limits = {f.name: getattr(r.limits, f.name) for f in r.limits.DESCRIPTOR.fields}
    generation = {name: _generation_model(getattr(r, name)) if r.HasField(name) else None
                  for name in ("reranker", "answerer")}
    return ServerInfo(r.version, r.default_model, models, limits, r.auth_enabled, **generation,
                      answerers=[_generation_model(a) for a in r.answerers])


def _generation_model(m: info_pb2.GenerationModelInfo) -> GenerationModel:
    expansion = round(m.default_expansion, 6) if m.HasField("default_expansion") else None  # float32 on the wire
    return GenerationModel(m.name, m.loaded, m.block_size, expansion, m.default_policy)


def _time(message, name: str):
    return getattr(message, name).ToDatetime() if message.HasField(name) else None


def collection(c: collections_pb2.Collection) -> Collection:
    return Collection(c.name, c.embedder, c.dim, _METRIC_NAMES.get(c.metric, "ip"), _KIND_NAMES.get(c.index_kind, "?"),
                      c.documents, c.chunks, dict(c.documents_by_status), _time(c, "created_at"))


def create_collection_request(name: str, *, embedder: str | None, dim: int | None, metric: str,
                              index_kind: str) -> collections_pb2.CreateCollectionRequest:
    request = collections_pb2.CreateCollectionRequest(name=name, embedder=embedder or "",
                                                      metric=_choice(metric, METRICS, "metric"),
                                                      index_kind=_choice(index_kind, INDEX_KINDS, "index kind"))
    if dim is not None:
        request.dim = dim
    return request


def job(j: documents_pb2.Job) -> Job:
    errors = [JobError(e.document_id or None, e.line or None, e.reason) for e in j.errors]
    return Job(j.id, j.kind, JOB_STATUSES.get(j.status, "unspecified"), j.collection, j.total, j.done, j.failed,
               errors, _time(j, "created_at"), _time(j, "finished_at"))


def _struct(value: Mapping[str, Any] | None) -> struct_pb2.Struct | None:
    if value is None:
        return None
    s = struct_pb2.Struct()
    s.update(dict(value))
    return s


def document(d: Document | Mapping[str, Any] | tuple) -> documents_pb2.Document:
    """A Document, a dict {"id", "text", "metadata"?}, or a tuple (id, text[, metadata])."""
    if isinstance(d, Document):
        doc_id, text, meta = d.id, d.text, d.metadata
    elif isinstance(d, Mapping):
        doc_id, text, meta = d["id"], d["text"], d.get("metadata")
    else:
        doc_id, text, *rest = d
        meta = rest[0] if rest else None
    return documents_pb2.Document(id=str(doc_id), text=text, metadata=_struct(meta or {}))


def search_request(collection: str, query: str, k: int, filters: Mapping[str, Any] | None,
                   rerank: bool) -> search_pb2.SearchRequest:
    return search_pb2.SearchRequest(collection=collection, query=query, k=k, filters=_struct(filters), rerank=rerank)


def hits(r: search_pb2.SearchResponse) -> list[Hit]:
    return [Hit(h.chunk_id, h.document_id, h.text, h.score, json_format.MessageToDict(h.metadata), h.ordinal,
                h.vector_score) for h in r.hits]


RERANK_MODES = {"full": 1, "first": 2, "sliding": 3, "inline": 4, "likelihood": 5}
_MODE_NAMES = {v: k for k, v in RERANK_MODES.items()} | {0: "full"}


def rerank_request(query: str, passages, mode: str | None, top_k: int | None, return_text: bool,
                   fuse: bool | None = None) -> rerank_pb2.RerankRequest:
    if isinstance(passages, str):
        raise TypeError("pass a list of passages; wrap a single passage in a list")
    if top_k is not None and top_k < 1:
        raise ValueError("top_k must be at least 1 (or None for all)")
    request = rerank_pb2.RerankRequest(query=query, passages=list(passages), top_k=top_k or 0,
                                       mode=0 if mode is None else _choice(mode, RERANK_MODES, "mode"),
                                       return_text=return_text)
    if fuse is not None:
        request.fuse = fuse
    return request


def rerank_result(r: rerank_pb2.RerankResponse) -> RerankResult:
    ranks = [Rank(x.index, x.score, x.text if x.HasField("text") else None) for x in r.ranks]
    return RerankResult(ranks, r.model, _MODE_NAMES.get(r.mode, "full"), r.passage_cap, r.truncated,
                        r.metadata.tokens, r.metadata.inference_time_ns / 1e9, r.metadata.request_id, r.fused)


def answer_request(question: str, collection: str | None, passages, k: int, max_new_tokens: int, temperature: float,
                   expansion: float | None, filters: Mapping[str, Any] | None,
                   policy: str = "", block_size: int = 0) -> answer_pb2.AnswerRequest:
    if isinstance(passages, str):
        raise TypeError("pass a list of passages; wrap a single passage in a list")
    request = answer_pb2.AnswerRequest(question=question, collection=collection or "", passages=list(passages),
                                       k=k, max_new_tokens=max_new_tokens, temperature=temperature,
                                       filters=_struct(filters), policy=policy, block_size=block_size)
    if expansion is not None:
        request.expansion = expansion
    return request


def precision_name(value: int) -> str:
    return _PRECISION_NAMES.get(value, "float32")
