"""The SQL schema: collections, documents, chunks (with their vectors), jobs and API keys, as typed ORM models.

This module only declares tables and the pure functions that derive their keys (`chunk_id`, `content_hash`,
`hash_api_key`). It opens no connection and creates no table: the schema reaches a database only through the
Alembic migrations in `migrations/versions/` (run by `sieve.store.migrate.upgrade`), and a test checks that the
migrations and these models describe the same schema. A change here therefore needs a new migration.

Status columns are short strings checked by a CHECK constraint rather than SQL enums: they read the same on
SQLite and PostgreSQL and a new state is a one-line migration, not an ALTER TYPE.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Deterministic constraint names, so migrations can refer to (and drop) them on every backend.
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSON on SQLite, JSONB on PostgreSQL (indexable, compact).
JSONType = JSON().with_variant(JSONB(), "postgresql")

DOCUMENT_STATUSES = ("pending", "indexed", "failed")
JOB_STATUSES = ("pending", "running", "done", "failed")
BATCH_STATUSES = ("pending", "done")
METRICS = ("ip", "l2")
INDEX_KINDS = ("flat", "hnsw", "ivf-pq")  # see sieve.store.index.IndexSpec

_INT63 = (1 << 63) - 1


def utcnow() -> datetime:
    return datetime.now(UTC)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def content_hash(text: str) -> str:
    """sha256 hex of a document's text: an unchanged document keeps its hash, so re-indexing can skip it."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chunk_id(collection: str, external_id: str, content_hash: str, ordinal: int) -> int:
    """The stable 64-bit id of one chunk, the same in SQL and in FAISS.

    A function of (collection name, document external id, content hash, ordinal) only, so a task that runs twice
    derives the same ids, and a changed document gets new ones. The key is JSON-encoded (no separator ambiguity),
    hashed with BLAKE2b-64 and masked to 63 bits: a non-negative signed int64, which SQL BIGINT and FAISS `idx_t`
    both hold and which never equals FAISS's -1 "no result". Collisions are a birthday bound over 2**63: about
    5e-6 at 10 million chunks; the primary key turns one into an error rather than a silent overwrite.
    """
    key = json.dumps([collection, external_id, content_hash, int(ordinal)], ensure_ascii=False, separators=(",", ":"))
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _INT63


def hash_api_key(raw_key: str) -> str:
    """sha256 hex of an API key. Keys are long random tokens, so an unsalted fast hash is enough to look one up
    without storing it; only the hash ever reaches the database."""
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONType, list[Any]: JSONType}


class Collection(Base):
    __tablename__ = "collections"
    __table_args__ = (
        CheckConstraint(_one_of("metric", METRICS), name="metric"),
        CheckConstraint(_one_of("index_kind", INDEX_KINDS), name="index_kind"),
        CheckConstraint("dim > 0", name="dim_positive"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    embedder: Mapped[str] = mapped_column(String(500))  # registered name or path, as given
    dim: Mapped[int] = mapped_column(Integer)
    metric: Mapped[str] = mapped_column(String(8), default="ip")
    index_kind: Mapped[str] = mapped_column(String(16), default="flat")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    documents: Mapped[list[Document]] = relationship(
        back_populates="collection", cascade="all, delete-orphan", passive_deletes=True
    )


class Document(Base):
    __tablename__ = "documents"
    __table_args__ = (
        UniqueConstraint("collection_id", "external_id"),
        CheckConstraint(_one_of("status", DOCUMENT_STATUSES), name="status"),
        Index(None, "collection_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"))
    external_id: Mapped[str] = mapped_column(String(512))
    text: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", default=dict)  # `metadata` is taken by the ORM
    content_hash: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    collection: Mapped[Collection] = relationship(back_populates="documents")
    chunks: Mapped[list[Chunk]] = relationship(
        back_populates="document", cascade="all, delete-orphan", passive_deletes=True, order_by="Chunk.ordinal"
    )


class Chunk(Base):
    __tablename__ = "chunks"
    __table_args__ = (
        UniqueConstraint("document_id", "ordinal"),
        CheckConstraint("token_start >= 0 AND token_end >= token_start", name="token_span"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)  # chunk_id(...)
    document_id: Mapped[int] = mapped_column(ForeignKey("documents.id", ondelete="CASCADE"))
    ordinal: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    token_start: Mapped[int] = mapped_column(Integer)  # [start, end) in the document's tokens
    token_end: Mapped[int] = mapped_column(Integer)

    document: Mapped[Document] = relationship(back_populates="chunks")


class ChunkVector(Base):
    """A chunk's embedding, float32 little-endian bytes: the durable copy FAISS indexes are rebuilt from.

    Its own table so that joining chunk text for search results never reads vector bytes.
    """

    __tablename__ = "chunk_vectors"

    chunk_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("chunks.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    dim: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class ChunkBlocks(Base):
    """A chunk's REFRAG block encodings, computed at index time so answering never re-encodes the corpus.

    One row per (chunk, k): the chunk's text in the decoder's tokens cut into blocks of k, one chunk-encoder vector
    per block, float16 bytes [ceil(n_tokens / k), dim]. `encoder` fingerprints the chunk encoder and the decoder's
    tokenizer (`sieve.refrag` refuses encodings made with others). Block spans follow from (n_tokens, k).
    """

    __tablename__ = "chunk_blocks"

    chunk_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("chunks.id", ondelete="CASCADE"), primary_key=True, autoincrement=False
    )
    k: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    encoder: Mapped[str] = mapped_column(String(200))
    n_tokens: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    data: Mapped[bytes] = mapped_column(LargeBinary)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (CheckConstraint(_one_of("status", JOB_STATUSES), name="status"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    collection_id: Mapped[int | None] = mapped_column(ForeignKey("collections.id", ondelete="CASCADE"), index=True)
    kind: Mapped[str] = mapped_column(String(32))  # e.g. "upsert", "delete", "drop"
    status: Mapped[str] = mapped_column(String(16), default="pending")
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[Any]] = mapped_column(default=list)  # [{"external_id" or "line": ..., "reason": ...}]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    collection: Mapped[Collection | None] = relationship()  # deleting the collection deletes its jobs (in SQL)


class JobBatch(Base):
    """One unit of a job's work (a list of documents), claimed by one worker at a time under a lease.

    Workers pull batches from SQL instead of trusting the broker to redeliver: a worker claims a pending batch by
    setting `owner` and `lease_until` (epoch seconds) in one conditional UPDATE, and a batch whose lease ran out, or
    whose owner process is gone, can be claimed again. A job's progress is the sum over its batches, written when a
    batch finishes, so a batch processed twice counts once. Batch 0 of an upsert records what was settled at submit
    time (unchanged documents as done, rejected ones as failed).
    """

    __tablename__ = "job_batches"
    __table_args__ = (
        UniqueConstraint("job_id", "ordinal"),
        CheckConstraint(_one_of("status", BATCH_STATUSES), name="status"),
        Index(None, "job_id", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    ordinal: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    items: Mapped[list[Any]] = mapped_column(default=list)  # document ids (upsert) or chunk ids (delete)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    errors: Mapped[list[Any]] = mapped_column(default=list)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(200))  # "host:pid" of the claiming worker
    lease_until: Mapped[float | None] = mapped_column(Float)  # epoch seconds
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # hash_api_key(raw); the raw key is never stored
    name: Mapped[str] = mapped_column(String(200))
    scopes: Mapped[list[Any]] = mapped_column(default=list)  # e.g. ["search:*", "index:docs"]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    @property
    def revoked(self) -> bool:
        return self.revoked_at is not None
