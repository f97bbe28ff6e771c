"""Composed files: a version file stored as ranges of other blobs (a fine-tuned shard whose
unchanged tensors are stored already), and the blobs each one reads.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 23:00:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "composed_files",
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("extents", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name=op.f("pk_composed_files")),
    )
    op.create_table(
        "composed_file_parts",
        sa.Column("file_sha256", sa.String(length=64), nullable=False),
        sa.Column("blob_digest", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(
            ["file_sha256"],
            ["composed_files.sha256"],
            name=op.f("fk_composed_file_parts_file_sha256_composed_files"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("file_sha256", "blob_digest", name=op.f("pk_composed_file_parts")),
    )
    with op.batch_alter_table("composed_file_parts", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_composed_file_parts_blob_digest"), ["blob_digest"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("composed_file_parts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_composed_file_parts_blob_digest"))
    op.drop_table("composed_file_parts")
    op.drop_table("composed_files")
