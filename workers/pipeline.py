"""The indexing pipeline a worker runs: claim a batch, chunk, embed, write chunks + vectors to SQL, update the index.

`drain(ctx, job_id)` is the whole of a worker's task: it claims batches of the job until none is left and processes
each. Processing is idempotent, in this order, so a crash anywhere is repaired by running the batch again:

  1. plan: chunk every pending document of the batch (token windows of the collection's embedder); chunk ids are
     `chunk_id(collection, external id, content hash, ordinal)`, so a re-run derives the same ids;
  2. embed the chunks SQL does not already hold with the same ids (a re-run after step 3 embeds nothing);
  3. one SQL transaction: replace each document's chunks and vectors (and, with `refrag_ks`, the chunks' REFRAG
     block encodings, so answering never re-encodes), mark it indexed (or failed, with why);
  4. under the collection's writer lock: remove the documents' old chunk ids from FAISS, add the new ones
     (`add` removes before adding, so adding twice is adding once), snapshot;
  5. mark the batch done and add it to the job's progress.

A document whose text cannot be embedded (a permanent error: the model refuses it) is marked failed with the reason
and the rest of its batch goes on. Transient errors (database or broker unavailable) propagate, the claim is
released, and Celery retries the task with backoff.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sieve.store.blocks import put_blocks
from sieve.store.db import session_scope
from sieve.store.errors import NotFound
from sieve.store.models import Chunk, ChunkVector, Collection, Document, chunk_id
from sieve.store.vectors import fetch_vectors, put_vectors
from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Engine

from . import jobs
from .chunking import Piece, chunk_text
from .writer import IndexWriter

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """What a worker process holds between tasks: the database, the index writer and loaded embedders."""

    engine: Engine
    index_root: Path
    model_home: Path  # where converted weights are cached (Settings.home / "cache")
    chunk_tokens: int = 256
    chunk_overlap: int = 32
    lease_s: float = 300.0
    device: str = "auto"
    dtype: str = "auto"
    refrag_ks: tuple[int, ...] = ()  # precompute REFRAG block encodings of every chunk at each of these k (): off
    refrag_model: str | None = None  # whose chunk encoder makes them (its own tuned one if it has it); None: MiniLM
    embedders: dict[str, Any] = field(default_factory=dict)
    writer: IndexWriter | None = None
    block_encoder: Any = None

    def __post_init__(self):
        self.writer = self.writer or IndexWriter(self.engine, self.index_root)

    def embedder(self, name: str):
        if name not in self.embedders:
            from sieve.embedder import load_embedder

            from sieve.registry import resolve_embedder

            self.embedders[name] = load_embedder(resolve_embedder(name), home=self.model_home, device=self.device,
                                                 dtype=self.dtype)
        return self.embedders[name]

    def blocks(self):
        """The REFRAG block encoder (decoder tokenizer + chunk encoder; no decoder weights), loaded once."""
        if self.block_encoder is None:
            from sieve.backbone.loader import resolve_device
            from sieve.refrag.encoder import load_block_encoder

            device = str(resolve_device(self.device))  # "auto" -> cuda or cpu: the encoder takes a real device
            self.block_encoder = load_block_encoder(home=self.model_home, device=device,
                                                    refrag_model=self.refrag_model)
        return self.block_encoder


def warm(ctx: WorkerContext, default_embedder: str) -> list[str]:
    """Load, and run once, what this worker's batches will need: the embedder of every collection (or
    `default_embedder` when there is none yet) and, when block encodings are on, the REFRAG block encoder. A worker
    that does this before it says ready does not charge its first batch for loading (~5 s for all-MiniLM-L6-v2 on a
    CPU). Returns the embedders loaded."""
    with session_scope(ctx.engine) as s:
        names = sorted(set(s.scalars(select(Collection.embedder))))
    names = names or [default_embedder]
    for name in names:
        ctx.embedder(name).encode_documents(["warm up"])
    if ctx.refrag_ks:
        ctx.blocks().encode_blocks(["warm up"], ctx.refrag_ks[0])
    return names


@dataclass
class BatchResult:
    done: int = 0
    failed: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    chunks_embedded: int = 0
    tokens_embedded: int = 0


def drain(ctx: WorkerContext, job_id: int) -> int:
    """Process claimable batches of `job_id` until none is left; returns how many this call processed."""
    processed = 0
    while (claim := jobs.claim_batch(ctx.engine, job_id, lease_s=ctx.lease_s)) is not None:
        try:
            process(ctx, claim)
        except NotFound:
            log.info("job %s is gone (its collection was dropped); stopping", job_id)
            return processed
        except PERMANENT as e:  # retrying cannot help: fail the batch's documents with the reason, go on
            log.exception("batch %s of job %s failed permanently", claim.batch_id, job_id)
            fail_batch(ctx, claim, f"{type(e).__name__}: {e}")
        except Exception:
            jobs.release_batch(ctx.engine, claim)
            raise
        processed += 1
    return processed


# Errors that running the batch again cannot fix (a misconfigured collection, a model that refuses its input).
# Anything else (database, broker, network, out of memory) is released and retried.
PERMANENT = (ValueError, TypeError, KeyError, FileNotFoundError)


def fail_batch(ctx: WorkerContext, claim: jobs.Claim, reason: str) -> None:
    errors = []
    with session_scope(ctx.engine) as s:
        for doc in s.scalars(select(Document).where(Document.id.in_(claim.items))):
            if claim.kind == "upsert" and doc.status != "indexed":
                doc.status, doc.error = "failed", reason
            errors.append({"external_id": doc.external_id, "reason": reason})
    jobs.finish_batch(ctx.engine, claim, done=0, failed=len(claim.items), errors=errors)


def process(ctx: WorkerContext, claim: jobs.Claim) -> BatchResult:
    with session_scope(ctx.engine) as s:
        collection = s.get(Collection, claim.collection_id)
        if collection is None:
            raise NotFound(f"collection of job {claim.job_id} no longer exists")
        s.expunge(collection)
    if claim.attempts > jobs.MAX_ATTEMPTS:  # its worker died every time (e.g. out of memory): stop trying
        fail_batch(ctx, claim, f"gave up after {claim.attempts - 1} attempts: the worker processing this batch "
                               "kept dying")
        return BatchResult(failed=len(claim.items))
    if claim.kind == "upsert":
        result = process_upsert(ctx, collection, claim.items)
    elif claim.kind == "delete":
        result = process_delete(ctx, collection, claim.items)
    else:
        raise ValueError(f"unknown job kind {claim.kind!r}")
    jobs.finish_batch(ctx.engine, claim, done=result.done, failed=result.failed, errors=result.errors)
    return result


@dataclass
class _Plan:
    doc_id: int
    external_id: str
    content_hash: str
    pieces: list[Piece]
    ids: list[int]
    old_ids: list[int]
    reuse: bool  # SQL already holds exactly these chunks with vectors (a re-run): nothing to embed or write


def process_upsert(ctx: WorkerContext, collection: Collection, doc_ids: list[int]) -> BatchResult:
    embedder = ctx.embedder(collection.embedder)
    size = max(8, min(ctx.chunk_tokens, embedder.max_length - 8))
    overlap = min(ctx.chunk_overlap, size // 2)
    result = BatchResult()
    plans: list[_Plan] = []
    with session_scope(ctx.engine) as s:
        docs = list(s.scalars(select(Document).where(Document.id.in_(doc_ids),
                                                     Document.collection_id == collection.id)))
        have = {}
        for cid, did in s.execute(select(Chunk.id, Chunk.document_id).where(Chunk.document_id.in_(doc_ids))):
            have.setdefault(did, []).append(cid)
        with_vectors = set(s.scalars(select(ChunkVector.chunk_id).join(Chunk, Chunk.id == ChunkVector.chunk_id)
                                     .where(Chunk.document_id.in_(doc_ids))))
        for doc in docs:
            pieces = chunk_text(doc.text, embedder.token_spans, size=size, overlap=overlap)
            if not pieces:
                doc.status, doc.error = "failed", "no text to index after tokenization"
                result.failed += 1
                result.errors.append({"external_id": doc.external_id, "reason": doc.error})
                continue
            ids = [chunk_id(collection.name, doc.external_id, doc.content_hash, p.ordinal) for p in pieces]
            old = have.get(doc.id, [])
            reuse = set(old) == set(ids) and all(i in with_vectors for i in ids)
            plans.append(_Plan(doc.id, doc.external_id, doc.content_hash, pieces, ids, old, reuse))
    # documents deleted since the job was submitted are simply gone: nothing to index, nothing to report

    vectors: dict[int, np.ndarray] = {}
    fresh = [p for p in plans if not p.reuse]
    texts = [piece.text for p in fresh for piece in p.pieces]
    if texts and collection.dim > embedder.dim:  # a configuration error, not a document's fault: fail the task
        raise ValueError(f"collection {collection.name!r} holds {collection.dim}-d vectors but its embedder "
                         f"{collection.embedder} gives {embedder.dim}-d ones")
    dim = collection.dim  # a smaller collection dim is a Matryoshka truncation (then normalized)
    if texts:
        try:
            embedded = embedder.encode_documents(texts, dim=dim)
        except (ValueError, RuntimeError) as e:  # find the culprit: embed document by document
            log.warning("embedding a batch of %d chunks failed (%s); retrying document by document", len(texts), e)
            embedded = None
        if embedded is not None:
            rows = iter(embedded)
            for p in fresh:
                vectors[p.doc_id] = np.stack([next(rows) for _ in p.pieces])
        else:
            for p in fresh:
                try:
                    vectors[p.doc_id] = embedder.encode_documents([piece.text for piece in p.pieces], dim=dim)
                except (ValueError, RuntimeError) as e:
                    result.errors.append({"external_id": p.external_id, "reason": f"embedding failed: {e}"})
        result.chunks_embedded = sum(len(v) for v in vectors.values())
    blocks: dict[int, list[dict[str, Any]]] = {}  # chunk id -> REFRAG block records (one per k), chunks embedded now
    if ctx.refrag_ks and vectors:
        todo = [(cid, piece.text) for p in fresh if p.doc_id in vectors for cid, piece in zip(p.ids, p.pieces)]
        texts = [t for _, t in todo]
        for k in ctx.refrag_ks:
            for (cid, _), e in zip(todo, ctx.blocks().encode_blocks(texts, k)):
                blocks.setdefault(cid, []).append(e.to_record())

    add_ids: list[int] = []
    add_vecs: list[np.ndarray] = []
    remove: list[int] = []
    failed_ids = {e["external_id"] for e in result.errors}
    with session_scope(ctx.engine) as s:
        for p in plans:
            doc = s.get(Document, p.doc_id)
            if doc is None or doc.content_hash != p.content_hash:
                continue  # deleted, or replaced again since we read it: the newer job indexes it
            if p.external_id in failed_ids:
                doc.status, doc.error = "failed", next(e["reason"] for e in result.errors
                                                       if e["external_id"] == p.external_id)
                result.failed += 1
                continue
            if p.reuse:
                vecs = fetch_vectors(s, np.asarray(p.ids))
            else:
                vecs = vectors[p.doc_id]
                if p.old_ids:
                    s.execute(delete(Chunk).where(Chunk.id.in_(p.old_ids)))
                s.execute(insert(Chunk), [
                    {"id": cid, "document_id": p.doc_id, "ordinal": piece.ordinal, "text": piece.text,
                     "token_start": piece.token_start, "token_end": piece.token_end}
                    for cid, piece in zip(p.ids, p.pieces)
                ])
                put_vectors(s, np.asarray(p.ids), vecs)
                put_blocks(s, [(cid, r) for cid in p.ids for r in blocks.get(cid, ())])
            doc.status, doc.error = "indexed", None
            keep = set(p.ids)
            remove.extend(i for i in p.old_ids if i not in keep)
            add_ids.extend(p.ids)
            add_vecs.append(vecs)
            result.done += 1
    if add_ids or remove:
        ctx.writer.apply(collection, remove=np.asarray(remove, dtype="int64"),
                         add_ids=np.asarray(add_ids, dtype="int64"),
                         add_vectors=np.concatenate(add_vecs) if add_vecs else None)
    return result


def process_delete(ctx: WorkerContext, collection: Collection, doc_ids: list[int]) -> BatchResult:
    """Remove documents: their chunk ids leave the index first, then the rows leave SQL (a crash in between
    leaves rows a re-run deletes; never index entries pointing at nothing for long: load reconciles them away)."""
    with session_scope(ctx.engine) as s:
        chunk_ids = np.fromiter(s.scalars(select(Chunk.id).where(Chunk.document_id.in_(doc_ids))), dtype="int64")
        present = s.scalar(select(Document.id).where(Document.id.in_(doc_ids)).limit(1)) is not None
    if len(chunk_ids):
        ctx.writer.apply(collection, remove=chunk_ids)
    if present:
        with session_scope(ctx.engine) as s:
            s.execute(delete(Document).where(Document.id.in_(doc_ids), Document.collection_id == collection.id))
    # a re-run finds the rows already gone: every document of the batch counts as deleted either way
    return BatchResult(done=len(doc_ids))


def wait_for_job(engine: Engine, job_id: int, *, timeout: float = 600.0, poll: float = 0.2) -> jobs.JobInfo:
    """Poll a job until it finishes (TimeoutError after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        info = jobs.get_job(engine, job_id)
        if info.finished:
            return info
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} did not finish in {timeout:.0f} s: {info.done + info.failed}/"
                               f"{info.total} documents settled")
        time.sleep(poll)
