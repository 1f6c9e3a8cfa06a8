"""Run the store's Alembic migrations from code: `upgrade(url)` brings a database to the newest schema.

The Alembic config is built here (script_location = the `migrations/` folder inside this package), so nothing
depends on the current directory or an alembic.ini. This is what `sieve db upgrade` calls; the service and workers
never create tables themselves. Upgrading a database that is already at head does nothing.

On PostgreSQL the whole upgrade runs in one transaction holding an advisory lock, so two hosts upgrading at once
take turns instead of racing on CREATE TABLE; on SQLite it runs in one transaction too (see db.py).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

from .db import make_engine

MIGRATIONS = Path(__file__).resolve().with_name("migrations")
_PG_LOCK_KEY = 0x5E7E_0001  # any constant unique to Sieve's migrations


def make_config(connection: Connection | None = None) -> Config:
    """An Alembic Config for this package's migrations; `connection` is what env.py migrates."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS).replace("%", "%%"))
    cfg.set_main_option("path_separator", "os")
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest revision the code knows."""
    revision = ScriptDirectory.from_config(make_config()).get_current_head()
    assert revision is not None, f"no migrations under {MIGRATIONS}"
    return revision


def upgrade(database_url: str, revision: str = "head") -> None:
    """Migrate the database at `database_url` up to `revision` (default: the newest)."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_PG_LOCK_KEY})")
            command.upgrade(make_config(connection), revision)
    finally:
        engine.dispose()


def downgrade(database_url: str, revision: str) -> None:
    """Migrate down to `revision` ("base" drops every table). For development and tests."""
    engine = make_engine(database_url)
    try:
        with engine.begin() as connection:
            command.downgrade(make_config(connection), revision)
    finally:
        engine.dispose()


def current(database_url: str) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    engine = make_engine(database_url)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
