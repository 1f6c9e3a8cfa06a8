"""What every servicer shares: settings, the model pool, the batcher, metrics, the store; and embedding through
the batcher (prepare -> queue -> finish), used by Embed, EmbedStream and Search alike."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .batcher import Batcher, Outcome
from .errors import ServiceError, invalid, unimplemented
from .metrics import Metrics
from .models import ModelPool

POOLINGS = {0: None, 1: "mean", 2: "last", 3: "weighted_mean"}  # sieve.v1.Pooling
PRECISIONS = {0: "float32", 1: "float32", 2: "int8", 3: "binary"}  # sieve.v1.Precision
PRECISION_ENUM = {"float32": 1, "int8": 2, "binary": 3}


@dataclass
class Plan:
    """A validated embedding request, apart from its texts."""

    model: str
    embedder: object
    instruction: str
    pooling: str
    dim: int
    precision: str
    truncate: bool
    normalize: bool


@dataclass
class ServerState:
    settings: object
    models: ModelPool
    batcher: Batcher
    metrics: Metrics
    engine: object | None = None  # SQLAlchemy engine; None: a server without a store (embeddings only)
    index_root: Path | None = None
    generation: object | None = None  # generation.Generators: the reranker and the REFRAG answerer, loaded lazily
    _searcher: object | None = field(default=None, repr=False)

    def need_store(self, what: str):
        if self.engine is None:
            raise unimplemented(what, "this server was started without a database")
        return self.engine

    def searcher(self):
        if self._searcher is None:
            try:
                from sieve.store.search import Searcher
            except ImportError as e:
                raise unimplemented("Search", f"the store's search module is missing ({e})") from None
            self._searcher = Searcher(self.need_store("Search"), self.index_root)
        return self._searcher

    async def retrieve(self, collection: str, query: str, k: int, filters: dict | None, *,
                       timeout: float | None, field: str = "query") -> tuple[list, Outcome]:
        """Search and Answer's first stage: embed `query` for `collection` (its embedder, query instruction and
        dim) through the batcher, then the top `k` chunks from its index (`sieve.store.search.Hit`s)."""
        engine = self.need_store("Search")

        def describe():
            from sieve.store import collections, session_scope

            with session_scope(engine) as s:
                c = collections.get_collection(s, collection)
                return c.embedder, c.dim

        embedder_name, dim = await asyncio.to_thread(describe)
        embedder = await self.models.get(embedder_name, trusted=True)
        plan = Plan(embedder_name, embedder, embedder.query_instruction, embedder.encoder.default_pooling,
                    min(dim, embedder.dim), "float32", True, True)
        vectors, outcome = await self.embed(plan, [query], timeout=timeout, field=field)
        searcher = self.searcher()
        hits = await asyncio.to_thread(searcher.search, collection, vectors[0], k, filters)
        return hits, outcome

    # ------------------------------------------------------------------------------------------------ embedding

    async def plan(self, options, prefix: str = "options.", *, model: str | None = None,
                   trusted: bool = False) -> Plan:
        """Check EmbedOptions (or anything with the same fields) -> Plan; errors name the field."""
        name = model if model is not None else options.model
        embedder = await self.models.get(name, field=f"{prefix}model", trusted=trusted)
        if options.pooling not in POOLINGS:
            raise invalid(f"{prefix}pooling", f"unknown value {options.pooling}; use POOLING_MEAN, POOLING_LAST, "
                          "POOLING_WEIGHTED_MEAN or leave it unspecified")
        if options.precision not in PRECISIONS:
            raise invalid(f"{prefix}precision", f"unknown value {options.precision}; use PRECISION_FLOAT32, "
                          "PRECISION_INT8 or PRECISION_BINARY")
        precision = PRECISIONS[options.precision]
        dim = embedder.dim
        if options.HasField("dim"):
            if not 1 <= options.dim <= embedder.dim:
                raise invalid(f"{prefix}dim", f"must be between 1 and {embedder.dim} for model "
                              f"{name or self.models.default!r}, got {options.dim}")
            dim = options.dim
        normalize = options.normalize if options.HasField("normalize") else True
        if precision == "int8" and embedder.calibration is None:
            raise invalid(f"{prefix}precision", f"model {name or self.models.default!r} has no int8 calibration; "
                          "use PRECISION_FLOAT32 or PRECISION_BINARY")
        if options.HasField("instruction"):
            instruction = options.instruction
        else:
            instruction = embedder.query_instruction if options.query else ""
        return Plan(name or self.models.default, embedder, instruction,
                    POOLINGS[options.pooling] or embedder.encoder.default_pooling, dim, precision,
                    options.truncate if options.HasField("truncate") else True, normalize)

    def check_texts(self, texts, field: str = "texts") -> list[str]:
        texts = list(texts)
        if not texts:
            raise invalid(field, "empty; send at least one text")
        limit = self.settings.max_texts_per_request
        if len(texts) > limit:
            raise invalid(field, f"{len(texts)} texts, over this server's limit of {limit} per call; split the call "
                          "(the SDK does this for you) or use EmbedStream")
        return texts

    async def embed(self, plan: Plan, texts: list[str], *, timeout: float | None, wait: bool = False,
                    field: str = "texts") -> tuple[np.ndarray, Outcome]:
        encoder = plan.embedder.encoder
        items = await asyncio.to_thread(prepare, encoder, texts, plan.instruction, plan.truncate, field)
        outcome = await self.batcher.submit((encoder, plan.pooling), items, timeout=timeout, wait=wait)
        return finish(plan.embedder, outcome.vectors, plan.dim, plan.normalize, plan.precision), outcome


def prepare(encoder, texts: list[str], instruction: str, truncate: bool, field: str):
    from sieve.embedder import InputTooLong

    items = []
    for i, text in enumerate(texts):
        try:
            items.append(encoder.prepare(text, instruction, truncate))
        except InputTooLong as e:
            raise invalid(f"{field}[{i}]", f"{e} (or set truncate)") from None
    return items


def finish(embedder, raw: np.ndarray, dim: int, normalize: bool, precision: str) -> np.ndarray:
    """Pooled vectors -> what `Embedder.encode` returns: Matryoshka cut, normalization, output precision."""
    from sieve.embedder import to_binary

    out = np.ascontiguousarray(raw[:, :dim], dtype=np.float32)
    if normalize:
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    if precision == "int8":
        return embedder.int8_ranges(dim, normalize).quantize(out)
    if precision == "binary":
        return to_binary(out)
    return out


def deadline_of(context) -> float | None:
    left = context.time_remaining()
    return None if left is None else max(0.0, left)


__all__ = ["PRECISION_ENUM", "Plan", "ServerState", "ServiceError", "deadline_of", "finish"]
