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
    with op.batch_alter_table("slides") as batch:
        batch.drop_index(batch.f("ix_slides_worker"))
        batch.drop_column("worker")
