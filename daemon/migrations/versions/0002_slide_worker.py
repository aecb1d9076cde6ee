"""slides.worker: which daemon (instrument) is counting a slide.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("slides") as batch:
        batch.add_column(sa.Column("worker", sa.String(length=100), nullable=True))
        batch.create_index(batch.f("ix_slides_worker"), ["worker"], unique=False)


def downgrade() -> None:
    # Not batch mode: on SQLite it rebuilds the table, and dropping the old one deletes every
    # row that references it (ON DELETE CASCADE, foreign keys on). SQLite 3.35+ drops a column.
    op.drop_index(op.f("ix_slides_worker"), table_name="slides")
    op.drop_column("slides", "worker")
