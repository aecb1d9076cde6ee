"""The audit trail and the sign-offs are append-only in the database itself: an audit event
is never changed or deleted, a review (sign-off, reopening, pre-review) keeps who, what, when
and its counts, and an issued report, once kept, is kept as issued. Deleting a slide that has
any of them is refused too (the cascade reaches them). Before this, one SQL DELETE erased a
signed slide's whole history without trace, and the next backup copied the loss.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

AUDIT = "audit events are append-only"
REVIEW = "a sign-off, reopening or pre-review is kept as made"
REPORT = "an issued report is kept as issued"
FIXED = "slide_id, username, action, at, counts_before, counts_after, note"

SQLITE = [
    ("audit_events_no_update", "BEFORE UPDATE ON audit_events", AUDIT, ""),
    ("audit_events_no_delete", "BEFORE DELETE ON audit_events", AUDIT, ""),
    ("reviews_no_delete", "BEFORE DELETE ON reviews", REVIEW, ""),
    ("reviews_fixed", f"BEFORE UPDATE OF {FIXED} ON reviews", REVIEW, ""),
    # The report is written once, after the sign-off's own row (daemon.report.freeze_report).
    ("reviews_report_once", "BEFORE UPDATE OF report ON reviews", REPORT,
     "WHEN OLD.report IS NOT NULL"),
]

POSTGRES = [
    ("audit_events_append_only", "BEFORE UPDATE OR DELETE ON audit_events", AUDIT, ""),
    ("reviews_no_delete", "BEFORE DELETE ON reviews", REVIEW, ""),
    ("reviews_fixed", f"BEFORE UPDATE OF {FIXED} ON reviews", REVIEW, ""),
    ("reviews_report_once", "BEFORE UPDATE OF report ON reviews", REPORT,
     "WHEN (OLD.report IS NOT NULL)"),
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name, when, message, condition in SQLITE:
            op.execute(f"CREATE TRIGGER {name} {when} FOR EACH ROW {condition} "
                       f"BEGIN SELECT RAISE(ABORT, '{message}'); END")
        return
    op.execute("CREATE FUNCTION marrowcount_refuse() RETURNS trigger LANGUAGE plpgsql AS "
               "$$ BEGIN RAISE EXCEPTION '%', TG_ARGV[0]; END $$")
    for name, when, message, condition in POSTGRES:
        op.execute(f"CREATE TRIGGER {name} {when} FOR EACH ROW {condition} "
                   f"EXECUTE FUNCTION marrowcount_refuse('{message}')")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for name, *_ in SQLITE:
            op.execute(f"DROP TRIGGER IF EXISTS {name}")
        return
    for name, when, *_ in POSTGRES:
        table = when.rsplit(" ON ", 1)[1]
        op.execute(f"DROP TRIGGER IF EXISTS {name} ON {table}")
    op.execute("DROP FUNCTION IF EXISTS marrowcount_refuse()")
