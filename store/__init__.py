"""The store: everything Sieve keeps that is not a model. SQL metadata and FAISS indexes.

    models.py      typed ORM models (collections, documents, chunks, chunk_vectors, jobs, api_keys), chunk ids
    db.py          make_engine(url) (SQLite: WAL, foreign keys, real transactions) and session_scope(engine)
    migrate.py     upgrade(url) / current(url): Alembic migrations in migrations/, run from code
    vectors.py     chunk vectors as bytes in SQL: the durable copy indexes are rebuilt from
    collections.py create / get / list collections
    search.py      query vectors -> ranked chunks with their text (index + SQL), reloading fresh snapshots
    errors.py      NotFound, AlreadyExists, InvalidInput: user-facing
    index.py       per-collection FAISS indexes (IndexIDMap2), idempotent writes, atomic snapshots, reconcile

The store does not chunk, embed or schedule anything (that is `sieve.workers`), and never creates tables outside
a migration. `sieve.store.index` imports faiss, so it is not imported here.
"""

from .db import make_engine, session_scope
from .migrate import current, upgrade
from .models import (
    ApiKey,
    Base,
    Chunk,
    ChunkBlocks,
    ChunkVector,
    Collection,
    Document,
    Job,
    JobBatch,
    chunk_id,
    content_hash,
    hash_api_key,
)

__all__ = [
    "ApiKey", "Base", "Chunk", "ChunkBlocks", "ChunkVector", "Collection", "Document", "Job", "JobBatch",
    "chunk_id", "content_hash", "current", "hash_api_key", "make_engine", "session_scope", "upgrade",
]
