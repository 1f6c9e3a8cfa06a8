"""Alembic environment for the store, driven from code by `sieve.store.migrate` (there is no alembic.ini).

The caller puts an open SQLAlchemy connection in `config.attributes["connection"]` (made by
`sieve.store.db.make_engine`, so SQLite gets its pragmas and real transactions) and owns its transaction.
Offline mode (SQL script output) is not supported: migrations run against a live database.
"""

from __future__ import annotations

from alembic import context
from sieve.store.models import Base

connection = context.config.attributes.get("connection")
if connection is None or context.is_offline_mode():
    raise RuntimeError("run migrations through sieve.store.migrate (it passes a live connection)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite has no ALTER COLUMN: alembic copies tables
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
