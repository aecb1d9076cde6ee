"""slides.case_info: the patient and specimen a slide belongs to (daemon.case.CaseInfo).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("slides", sa.Column("case_info", sa.JSON(), nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite it rebuilds the table, and dropping the old one deletes every
    # row that references it (ON DELETE CASCADE, foreign keys on). SQLite 3.35+ drops a column.
    op.drop_column("slides", "case_info")
