"""fields.method: the software, classifier model and settings that analysed each field.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("fields") as batch:
        batch.add_column(sa.Column("method", sa.JSON(), nullable=True))


def downgrade() -> None:
    # Not batch mode: on SQLite it rebuilds the table, and dropping the old one deletes every
    # row that references it (ON DELETE CASCADE, foreign keys on). SQLite 3.35+ drops a column.
    op.drop_column("fields", "method")
