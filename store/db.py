"""Engines and sessions for the store, on SQLite (embedded default) or PostgreSQL (scaled).

`make_engine(url)` is the one place a database URL becomes an engine; `session_scope(engine)` is one transaction.
Nothing here creates tables: that is the migrations' job (`sieve.store.migrate`).

SQLite is set up on every new connection for a service and workers sharing one file:
  - `journal_mode=WAL`: readers never block the writer and the writer never blocks readers;
  - `foreign_keys=ON`: SQLite ignores REFERENCES / ON DELETE CASCADE without it;
  - `synchronous=NORMAL` (safe with WAL: a power cut can lose the last commits, never corrupt the file);
  - a 30 s busy timeout, so a second writer waits for the lock instead of failing at once;
  - real transactions: pysqlite by default starts a transaction only before INSERT/UPDATE/DELETE and commits
    DDL immediately; here the driver's own handling is switched off and SQLAlchemy emits BEGIN itself, so a
    migration (DDL + its version stamp) commits or rolls back as one.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

SQLITE_BUSY_TIMEOUT_S = 30


def make_engine(url: str, **kwargs) -> Engine:
    """An engine for `url`; for a SQLite file, its folder is created and the connection pragmas above are set."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_S)
        engine = create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine
    kwargs.setdefault("pool_pre_ping", True)  # survive a database restart between requests
    return create_engine(parsed, **kwargs)


def _sqlite_on_connect(dbapi_connection, _record) -> None:
    dbapi_connection.isolation_level = None  # autocommit at the driver: pragmas apply, BEGIN is ours
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def _sqlite_on_begin(connection) -> None:
    connection.exec_driver_sql("BEGIN")


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """One unit of work: commits when the block ends, rolls back if it raises. Loaded objects stay readable after
    the block (no expiry on commit), so results can be returned from it."""
    with Session(engine, expire_on_commit=False) as session, session.begin():
        yield session
