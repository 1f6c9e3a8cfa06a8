"""Jobs in SQL: submit an upsert or a delete, claim its batches under a lease, record progress, drop a collection.

Everything here is plain SQL through SQLAlchemy; nothing embeds or touches FAISS (that is `pipeline.py`), and
nothing sends a message except through the `enqueue` callable a submit is given (by default the Celery task in
`tasks.py`). So a job's whole life can be driven and tested without a broker.

How a job survives crashes: the broker only carries wake-ups ("work on job J"). The work itself is the job's rows in
`job_batches`, which a worker claims with a compare-and-set UPDATE (owner + lease) and marks done when its results
are in SQL and in the index. A message lost with a killed worker (Celery's SQLAlchemy transport does not redeliver)
costs nothing: the batch it was working on stays pending, its owner is seen to be dead (same host) or its lease runs
out (another host), and the next wake-up, from a sweep that every worker runs at start and periodically, claims it.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sieve.store.collections import get_collection
from sieve.store.db import session_scope
from sieve.store.errors import InvalidInput, NotFound
from sieve.store.models import Chunk, Collection, Document, Job, JobBatch, content_hash, utcnow
from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import Engine

Enqueue = Callable[[int, int], None]  # (job id, how many wake-up messages)

MAX_ATTEMPTS = 5  # claims of one batch before its documents are marked failed (a batch that kills its worker)
MAX_ERRORS_SHOWN = 1000  # errors kept on a job; the counts stay exact past it


@dataclass
class DocumentIn:
    external_id: str
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class JobInfo:
    id: int
    kind: str
    status: str  # pending | running | done | failed
    collection: str | None
    total: int
    done: int
    failed: int
    errors: list[dict[str, Any]]
    created_at: datetime
    finished_at: datetime | None

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")


@dataclass(frozen=True)
class Claim:
    batch_id: int
    job_id: int
    kind: str
    collection_id: int
    items: list[Any]
    attempts: int


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_is_dead(owner: str | None) -> bool:
    """True when `owner` ("host:pid") is a process on this host that no longer runs (or is a zombie)."""
    if not owner:
        return True
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another host's worker: only its lease tells
    if int(pid) == os.getpid():
        return True  # a claim this very process left behind (an error unwound it): take it back
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed child its parent has not reaped yet still answers kill(0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# -- submit ----------------------------------------------------------------------------------------------------


def _default_enqueue(job_id: int, messages: int) -> None:
    from .tasks import enqueue

    enqueue(job_id, messages)


def _new_job(session, collection: Collection, kind: str, total: int) -> Job:
    job = Job(collection_id=collection.id, kind=kind, status="pending", total=total, done=0, failed=0, errors=[])
    session.add(job)
    session.flush()
    return job


def _add_batches(session, job: Job, items: list[Any], size: int) -> int:
    n = 0
    for n, start in enumerate(range(0, len(items), size), start=1):
        session.add(JobBatch(job_id=job.id, ordinal=n, status="pending", items=items[start:start + size],
                             done=0, failed=0, errors=[], attempts=0))
    return n


def submit_upsert(engine: Engine, collection: str, documents: Iterable[DocumentIn], *,
                  rejected: Iterable[dict[str, Any]] = (), batch_documents: int = 32, fanout: int = 8,
                  enqueue: Enqueue | None = None) -> JobInfo:
    """Write `documents` to SQL (insert, or replace by external id) and queue them for indexing; returns the job.

    Settled at once, without a worker: a document whose text and metadata are unchanged (done, nothing to do), one
    whose metadata alone changed (updated in place: its chunks and vectors stay valid), an empty one (failed,
    "empty text"), and `rejected` entries the caller could not parse (e.g. {"line": 7, "reason": ...}), which
    count as failed. If an external id appears twice, the last copy wins and the earlier ones are reported.
    A changed document keeps serving its old chunks until its new ones are indexed.
    """
    documents = list(documents)
    errors: list[dict[str, Any]] = [dict(r) for r in rejected]
    failed = len(errors)
    last: dict[str, int] = {}
    for i, doc in enumerate(documents):
        if not isinstance(doc.external_id, str) or not doc.external_id or len(doc.external_id) > 512:
            raise InvalidInput(f"documents[{i}].external_id must be 1-512 characters, got {doc.external_id!r}")
        if not isinstance(doc.metadata, dict):
            raise InvalidInput(f"documents[{i}].metadata must be an object, got {type(doc.metadata).__name__}")
        if doc.external_id in last:
            errors.append({"external_id": doc.external_id, "reason": "duplicate external id in this request: "
                           "the last copy was kept"})
            failed += 1
        last[doc.external_id] = i
    done = 0
    to_index: list[int] = []
    with session_scope(engine) as s:
        coll = get_collection(s, collection)
        existing = {}
        ids = list(last)
        for start in range(0, len(ids), 1000):
            for d in s.scalars(select(Document).where(Document.collection_id == coll.id,
                                                      Document.external_id.in_(ids[start:start + 1000]))):
                existing[d.external_id] = d
        for external_id, i in last.items():
            doc = documents[i]
            if not doc.text or not doc.text.strip():
                errors.append({"external_id": external_id, "reason": "empty text: document skipped"})
                failed += 1
                continue
            digest = content_hash(doc.text)
            row = existing.get(external_id)
            if row is not None and row.content_hash == digest and row.status == "indexed":
                if row.meta != doc.metadata:
                    row.meta = doc.metadata
                done += 1
                continue
            if row is None:
                row = Document(collection_id=coll.id, external_id=external_id, text=doc.text, meta=doc.metadata,
                               content_hash=digest, status="pending")
                s.add(row)
            else:
                row.text, row.meta, row.content_hash, row.status, row.error = (
                    doc.text, doc.metadata, digest, "pending", None)
            to_index.append(row)
        s.flush()
        job = _new_job(s, coll, "upsert", total=failed + done + len(to_index))
        s.add(JobBatch(job_id=job.id, ordinal=0, status="done", items=[], done=done, failed=failed,
                       errors=errors[:MAX_ERRORS_SHOWN], attempts=0))
        n_batches = _add_batches(s, job, [d.id for d in to_index], batch_documents)
        _refresh_job(s, job)
        job_id = job.id
    if n_batches:
        (enqueue or _default_enqueue)(job_id, min(n_batches, fanout))
    return get_job(engine, job_id)


def submit_delete(engine: Engine, collection: str, external_ids: Iterable[str], *, batch_documents: int = 256,
                  fanout: int = 8, enqueue: Enqueue | None = None) -> JobInfo:
    """Queue the removal of documents by external id (their chunks leave the index, then SQL). Unknown ids are
    reported on the job as failed, "not found"."""
    wanted = list(dict.fromkeys(external_ids))
    with session_scope(engine) as s:
        coll = get_collection(s, collection)
        found: dict[str, int] = {}
        for start in range(0, len(wanted), 1000):
            found.update(s.execute(select(Document.external_id, Document.id).where(
                Document.collection_id == coll.id, Document.external_id.in_(wanted[start:start + 1000]))).all())
        errors = [{"external_id": e, "reason": "not found in this collection"} for e in wanted if e not in found]
        job = _new_job(s, coll, "delete", total=len(wanted))
        s.add(JobBatch(job_id=job.id, ordinal=0, status="done", items=[], done=0, failed=len(errors),
                       errors=errors[:MAX_ERRORS_SHOWN], attempts=0))
        n_batches = _add_batches(s, job, sorted(found.values()), batch_documents)
        _refresh_job(s, job)
        job_id = job.id
    if n_batches:
        (enqueue or _default_enqueue)(job_id, min(n_batches, fanout))
    return get_job(engine, job_id)


# -- read ------------------------------------------------------------------------------------------------------


def _info(job: Job, collection: str | None) -> JobInfo:
    return JobInfo(id=job.id, kind=job.kind, status=job.status, collection=collection, total=job.total,
                   done=job.done, failed=job.failed, errors=list(job.errors or []), created_at=job.created_at,
                   finished_at=job.finished_at)


def get_job(engine: Engine, job_id: int) -> JobInfo:
    with session_scope(engine) as s:
        row = s.execute(select(Job, Collection.name).outerjoin(Collection, Collection.id == Job.collection_id)
                        .where(Job.id == int(job_id))).first()
        if row is None:
            raise NotFound(f"job {job_id} does not exist")
        return _info(row[0], row[1])


def unfinished_jobs(engine: Engine) -> list[int]:
    with session_scope(engine) as s:
        return list(s.scalars(select(Job.id).where(Job.status.in_(("pending", "running"))).order_by(Job.id)))


def stalled_jobs(engine: Engine, now: float | None = None) -> list[int]:
    """Unfinished jobs with a batch that could be claimed right now (a wake-up may have been lost), or with every
    batch done but the job not closed (a worker died in between; `finish_batch` of a re-run closes it)."""
    now = time.time() if now is None else now
    out = []
    with session_scope(engine) as s:
        rows = s.execute(select(JobBatch.job_id, JobBatch.owner, JobBatch.lease_until)
                         .join(Job, Job.id == JobBatch.job_id)
                         .where(Job.status.in_(("pending", "running")), JobBatch.status == "pending")).all()
        for job_id, owner, lease in rows:
            if job_id not in out and (owner is None or lease is None or lease < now or owner_is_dead(owner)):
                out.append(job_id)
        for job in s.scalars(select(Job).where(Job.status.in_(("pending", "running")))):
            if job.id not in out and not _pending_batches(s, job.id):
                _refresh_job(s, job)
    return sorted(out)


# -- claim and finish ------------------------------------------------------------------------------------------


def claim_batch(engine: Engine, job_id: int, *, lease_s: float, owner: str | None = None) -> Claim | None:
    """Claim one pending batch of `job_id` that nobody holds (never claimed, lease expired, or owner dead).

    A compare-and-set on (owner, lease_until) as read, so two workers can never both win one batch, on SQLite
    and on PostgreSQL alike. None when nothing is claimable now (all done, or held by live workers).
    """
    owner = owner or owner_id()
    while True:
        now = time.time()
        with session_scope(engine) as s:
            rows = s.execute(select(JobBatch.id, JobBatch.owner, JobBatch.lease_until)
                             .where(JobBatch.job_id == job_id, JobBatch.status == "pending")
                             .order_by(JobBatch.ordinal)).all()
        candidates = [(i, o, lease) for i, o, lease in rows
                      if o is None or lease is None or lease < now or owner_is_dead(o)]
        if not candidates:
            return None
        for batch_id, seen_owner, seen_lease in candidates:
            with session_scope(engine) as s:
                cond = [JobBatch.id == batch_id, JobBatch.status == "pending",
                        JobBatch.owner.is_(None) if seen_owner is None else JobBatch.owner == seen_owner,
                        JobBatch.lease_until.is_(None) if seen_lease is None else JobBatch.lease_until == seen_lease]
                won = s.execute(update(JobBatch).where(*cond).values(
                    owner=owner, lease_until=now + lease_s, attempts=JobBatch.attempts + 1,
                )).rowcount == 1
                if not won:
                    continue
                batch = s.get(JobBatch, batch_id)
                job = s.get(Job, batch.job_id)
                if job.status == "pending":
                    job.status = "running"
                return Claim(batch_id=batch.id, job_id=job.id, kind=job.kind, collection_id=job.collection_id,
                             items=list(batch.items), attempts=batch.attempts)
        # every candidate was taken by someone else between the read and the update: look again


def release_batch(engine: Engine, claim: Claim, *, retry_in: float = 0.0) -> None:
    """Give a claimed batch back (after a transient error): claimable again after `retry_in` seconds."""
    with session_scope(engine) as s:
        s.execute(update(JobBatch).where(JobBatch.id == claim.batch_id, JobBatch.status == "pending")
                  .values(owner=None, lease_until=time.time() + retry_in if retry_in > 0 else None))


def finish_batch(engine: Engine, claim: Claim, *, done: int, failed: int, errors: list[dict[str, Any]]) -> JobInfo:
    """Record a batch's outcome and the job's progress (a sum over batches: finishing twice counts once)."""
    with session_scope(engine) as s:
        batch = s.get(JobBatch, claim.batch_id)
        job = s.get(Job, claim.job_id)
        if batch is None or job is None:  # the collection (and its jobs) was dropped meanwhile
            raise NotFound(f"job {claim.job_id} no longer exists")
        batch.status, batch.done, batch.failed, batch.errors = "done", done, failed, errors[:MAX_ERRORS_SHOWN]
        batch.owner, batch.lease_until = None, None
        s.flush()
        _refresh_job(s, job)
        return _info(job, None)


def _pending_batches(session, job_id: int) -> int:
    return int(session.scalar(select(func.count()).select_from(JobBatch)
                              .where(JobBatch.job_id == job_id, JobBatch.status == "pending")) or 0)


def _refresh_job(session, job: Job) -> None:
    done, failed = session.execute(select(func.coalesce(func.sum(JobBatch.done), 0),
                                          func.coalesce(func.sum(JobBatch.failed), 0))
                                   .where(JobBatch.job_id == job.id)).one()
    job.done, job.failed = int(done), int(failed)
    errors: list[dict[str, Any]] = []
    for batch_errors in session.scalars(select(JobBatch.errors).where(JobBatch.job_id == job.id)
                                        .order_by(JobBatch.ordinal)):
        errors.extend(batch_errors or [])
        if len(errors) >= MAX_ERRORS_SHOWN:
            break
    job.errors = errors[:MAX_ERRORS_SHOWN]
    if not _pending_batches(session, job.id) and job.status in ("pending", "running"):
        job.status = "failed" if job.total and job.failed == job.total else "done"
        job.finished_at = utcnow()


# -- drop ------------------------------------------------------------------------------------------------------


def drop_collection(engine: Engine, index_root: Path, name: str) -> None:
    """Delete a collection: its documents, chunks, vectors and jobs in SQL, then its index files. Holds the
    collection's index-writer lock, so no worker writes a half-dropped index; a worker still holding a batch of
    it finds its job gone and stops."""
    from .writer import collection_lock

    with session_scope(engine) as s:
        get_collection(s, name)  # NotFound before taking any lock
    with collection_lock(engine, index_root, name):
        with session_scope(engine) as s:
            coll = get_collection(s, name)
            # bulk deletes in dependency order: quicker than ORM cascades on a big collection
            doc_ids = select(Document.id).where(Document.collection_id == coll.id).scalar_subquery()
            s.execute(delete(Chunk).where(Chunk.document_id.in_(doc_ids)))
            s.execute(delete(Document).where(Document.collection_id == coll.id))
            s.execute(delete(JobBatch).where(JobBatch.job_id.in_(select(Job.id).where(Job.collection_id == coll.id))))
            s.execute(delete(Job).where(Job.collection_id == coll.id))
            s.delete(coll)
        from sieve.store.index import IndexManager

        IndexManager(index_root).drop(name)
