"""Collections: create, look up, list, count. Dropping one (SQL rows and index files together) is a workers job
(`sieve.workers.jobs.drop_collection`), because it must not race an index writer."""

from __future__ import annotations

import re

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from .errors import AlreadyExists, InvalidInput, NotFound
from .models import INDEX_KINDS, METRICS, Chunk, Collection, Document

# the same rule the index folders use (sieve.store.index): a collection name is also a directory name
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInput(f"collection name {name!r}: use 1-200 letters, digits, '.', '_' or '-', "
                           "starting with a letter or digit")
    return name


def create_collection(session: Session, name: str, *, embedder: str, dim: int, metric: str = "ip",
                      index_kind: str = "flat") -> Collection:
    """Add a collection. `dim` is the embedder's output size (vectors of another size are refused later)."""
    check_name(name)
    if metric not in METRICS:
        raise InvalidInput(f"metric {metric!r}: choose one of {', '.join(METRICS)}")
    if index_kind not in INDEX_KINDS:
        raise InvalidInput(f"index kind {index_kind!r}: choose one of {', '.join(INDEX_KINDS)}")
    if int(dim) <= 0:
        raise InvalidInput(f"dim must be positive, got {dim}")
    if session.scalar(select(Collection.id).where(Collection.name == name)) is not None:
        raise AlreadyExists(f"collection {name!r} already exists")
    collection = Collection(name=name, embedder=embedder, dim=int(dim), metric=metric, index_kind=index_kind)
    session.add(collection)
    try:
        session.flush()
    except IntegrityError as e:  # a concurrent create won the race
        raise AlreadyExists(f"collection {name!r} already exists") from e
    return collection


def get_collection(session: Session, name: str) -> Collection:
    collection = session.scalar(select(Collection).where(Collection.name == name))
    if collection is None:
        raise NotFound(f"collection {name!r} does not exist")
    return collection


def list_collections(session: Session) -> list[Collection]:
    return list(session.scalars(select(Collection).order_by(Collection.name)))


def collection_stats(session: Session, collection: Collection) -> dict[str, int]:
    """Documents by status and the number of chunks: what `sieve collections` and the Get RPC show."""
    by_status = dict(session.execute(
        select(Document.status, func.count()).where(Document.collection_id == collection.id).group_by(Document.status)
    ).all())
    chunks = session.scalar(
        select(func.count()).select_from(Chunk).join(Document).where(Document.collection_id == collection.id))
    return {"documents": sum(by_status.values()), "indexed": by_status.get("indexed", 0),
            "pending": by_status.get("pending", 0), "failed": by_status.get("failed", 0), "chunks": int(chunks or 0)}
