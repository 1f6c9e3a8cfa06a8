"""Chunk blocks: REFRAG block encodings of each chunk, precomputed at index time (see models.ChunkBlocks).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "chunk_blocks",
        sa.Column("chunk_id", sa.BigInteger(), nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("encoder", sa.String(200), nullable=False),
        sa.Column("n_tokens", sa.Integer(), nullable=False),
        sa.Column("dim", sa.Integer(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("chunk_id", "k", name="pk_chunk_blocks"),
        sa.ForeignKeyConstraint(["chunk_id"], ["chunks.id"], ondelete="CASCADE",
                                name="fk_chunk_blocks_chunk_id_chunks"),
    )


def downgrade() -> None:
    op.drop_table("chunk_blocks")
