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
    # Plain DROP COLUMN (SQLite 3.35+), as in the other downgrades. The issued reports go
    # with it: a reprint after upgrading again is rebuilt under the config of that time.
    op.drop_column("reviews", "report")
