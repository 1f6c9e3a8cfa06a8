"""Initial schema: collections, documents, chunks, chunk_vectors, jobs, api_keys.

Revision ID: 0001
Revises:
Create Date: 2026-11-24

Written out in full (not imported from models.py) so this migration never changes when the models do.
Constraint names follow models.NAMING.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSONType = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "collections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("embedder", sa.String(500), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("metric", sa.String(8), nullable=False),
        sa.Column("index_kind", sa.String(16), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_collections"),
        sa.UniqueConstraint("name", name="uq_collections_name"),
        sa.CheckConstraint("metric IN ('ip', 'l2')", name="ck_collections_metric"),
        sa.CheckConstraint("index_kind IN ('flat', 'hnsw', 'ivf-pq')", name="ck_collections_index_kind"),
        sa.CheckConstraint("dim > 0", name="ck_collections_dim_positive"),
    )
    op.create_table(
        "documents",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=False),
        sa.Column("external_id", sa.String(512), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("metadata", JSONType, nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_documents"),
        sa.ForeignKeyConstraint(["collection_id"], ["collections.id"], ondelete="CASCADE",
                                name="fk_documents_collection_id_collections"),
        sa.UniqueConstraint("collection_id", "external_id", name="uq_documents_collection_id_external_id"),
        sa.CheckConstraint("status IN ('pending', 'indexed', 'failed')", name="ck_documents_status"),
    )
    op.create_index("ix_documents_collection_id_status", "documents", ["collection_id", "status"])
    op.create_table(
        "chunks",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("document_id", sa.Integer(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_start", sa.Integer(), nullable=False),
        sa.Column("token_end", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_chunks"),
        sa.ForeignKeyConstraint(["document_id"], ["documents.id"], ondelete="CASCADE",
                                name="fk_chunks_document_id_documents"),
        sa.UniqueConstraint("document_id", "ordinal", name="uq_chunks_document_id_ordinal"),
        sa.CheckConstraint("token_start >= 0 AND token_end >= token_start", name="ck_chunks_token_span"),
    )
    op.create_table(
        "chunk_vectors",
        sa.Column("chunk_id", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("chunk_id", name="pk_chunk_vectors"),
        sa.ForeignKeyConstraint(["chunk_id"], ["chunks.id"], ondelete="CASCADE",
                                name="fk_chunk_vectors_chunk_id_chunks"),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("collection_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("errors", JSONType, nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        _ts("finished_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_jobs"),
        sa.ForeignKeyConstraint(["collection_id"], ["collections.id"], ondelete="CASCADE",
                                name="fk_jobs_collection_id_collections"),
        sa.CheckConstraint("status IN ('pending', 'running', 'done', 'failed')", name="ck_jobs_status"),
    )
    op.create_index("ix_jobs_collection_id", "jobs", ["collection_id"])
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("scopes", JSONType, nullable=False),
        _ts("created_at"),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
    )


def downgrade() -> None:
    op.drop_table("api_keys")
    op.drop_index("ix_jobs_collection_id", table_name="jobs")
    op.drop_table("jobs")
    op.drop_table("chunk_vectors")
    op.drop_table("chunks")
    op.drop_index("ix_documents_collection_id_status", table_name="documents")
    op.drop_table("documents")
    op.drop_table("collections")
