"""reviews.report: the report a sign-off issued, kept as issued.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("reviews", sa.Column("report", sa.JSON(), nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite it rebuilds the table, and dropping the old one deletes every
    # row that references it (ON DELETE CASCADE, foreign keys on). SQLite 3.35+ drops a column.
    op.drop_column("reviews", "report")
