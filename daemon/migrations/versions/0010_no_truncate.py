"""PostgreSQL: TRUNCATE of the audit trail or the sign-offs is refused too. Row triggers
(0009) do not fire on TRUNCATE, so one statement (``TRUNCATE audit_events`` or ``TRUNCATE
slides CASCADE``) still erased them. SQLite has no TRUNCATE: nothing changes there.

The table owner can still drop triggers: they stop accidents and scripts, not a database
administrator set on it (the backups and the exported reports are the record then).

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

TRIGGERS = [
    ("audit_events_no_truncate", "audit_events", "audit events are append-only"),
    ("reviews_no_truncate", "reviews", "a sign-off, reopening or pre-review is kept as made"),
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for name, table, message in TRIGGERS:
        op.execute(f"CREATE TRIGGER {name} BEFORE TRUNCATE ON {table} FOR EACH STATEMENT "
                   f"EXECUTE FUNCTION marrowcount_refuse('{message}')")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        return
    for name, table, _ in TRIGGERS:
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
