"""reviews.exported_at: when a sign-off's report or a reopening's withdrawal notice was
written to the laboratory's export folder (daemon.report_export).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("reviews", sa.Column("exported_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite it rebuilds the table, and dropping the old one deletes every
    # row that references it (ON DELETE CASCADE, foreign keys on). SQLite 3.35+ drops a column.
    op.drop_column("reviews", "exported_at")
