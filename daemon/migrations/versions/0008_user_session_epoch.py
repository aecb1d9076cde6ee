"""users.session_epoch: bumped when a user logs out or gets a new password, so every session
cookie issued before ends (the signed cookie had stayed valid until it expired: a stolen one
outlived both).

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("users", sa.Column("session_epoch", sa.Integer(), nullable=False,
                                     server_default="0"))


def downgrade() -> None:
    op.drop_column("users", "session_epoch")
