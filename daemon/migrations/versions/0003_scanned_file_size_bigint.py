"""scanned_files.size as a 64-bit integer: whole-slide files pass 2 GiB (PostgreSQL's
INTEGER stops there; SQLite's does not, so this changes only the declared type there).

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("scanned_files") as batch:
        batch.alter_column("size", existing_type=sa.Integer(), type_=sa.BigInteger(),
                           existing_nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("scanned_files") as batch:
        batch.alter_column("size", existing_type=sa.BigInteger(), type_=sa.Integer(),
                           existing_nullable=False)
