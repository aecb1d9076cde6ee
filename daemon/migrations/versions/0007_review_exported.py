"""reviews.exported_at / export_claimed_at: when a sign-off's report or a reopening's
withdrawal notice was written to the laboratory's export folder, and when an exporter took it
on (daemon.report_export).

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
    op.add_column("reviews", sa.Column("export_claimed_at", sa.DateTime(timezone=True),
                                       nullable=True))


def downgrade() -> None:
    # Plain DROP COLUMN (SQLite 3.35+), as in the other downgrades. Upgrading again forgets
    # what was exported: every sign-off since exporting began goes to the folder again.
    op.drop_column("reviews", "export_claimed_at")
    op.drop_column("reviews", "exported_at")
