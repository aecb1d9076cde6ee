"""ORM tables of the store (SQLAlchemy 2). Migrations live in daemon/migrations (Alembic).

A field and its cells are written in one transaction with the slide's running counts;
``(slide_id, index)`` keys a field so that committing it twice is a no-op.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    and_,
)
from sqlalchemy.ext.hybrid import hybrid_property
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.sql.elements import ColumnElement

SLIDE_STATUSES = ("queued", "acquiring", "awaiting_review", "signed", "failed")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


# Why a reviewer leaves a cell out of the count (Cell.exclude_reason), as the page and the
# report word it. Undoing an added cell leaves it out as "added_in_error".
EXCLUDE_REASONS = {
    "not_leukocyte": "Not a leukocyte",
    "smudge": "Smudge / broken cell",
    "duplicate": "Duplicate of another cell",
}


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Slide(Base):
    __tablename__ = "slides"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    # "virtual", "microscope" or "folder"
    source: Mapped[str] = mapped_column(String(20))
    # What to acquire from: a slide file, a .cfg, a watched file path.
    source_ref: Mapped[str] = mapped_column(Text, default="")
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    target: Mapped[int] = mapped_column(Integer)
    taxonomy: Mapped[str] = mapped_column(String(50))
    um_per_px: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    # The frozen field plan and acquisition settings, so a resumed slide follows the same plan.
    plan: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON, nullable=True)
    # Patient and specimen (daemon.case.CaseInfo, set fields only); completed at review.
    case_info: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON, nullable=True)
    stopped_because: Mapped[Optional[str]] = mapped_column(String(50), nullable=True)
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True), nullable=True)
    signed_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True), nullable=True)
    signed_by: Mapped[Optional[str]] = mapped_column(String(100), nullable=True)
    # The daemon counting it ("instrument name"): on restart a daemon resumes only its own
    # slides left in "acquiring", never another instrument's (stores shared over PostgreSQL).
    worker: Mapped[Optional[str]] = mapped_column(String(100), nullable=True, index=True)

    # The database deletes a slide's fields, cells and counts (ON DELETE CASCADE).
    fields: Mapped[list["Field"]] = relationship(
        back_populates="slide", order_by="Field.index", cascade="all, delete-orphan",
        passive_deletes=True,
    )


class Field(Base):
    __tablename__ = "fields"
    __table_args__ = (UniqueConstraint("slide_id", "index", name="uq_field_slide_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    stage_x: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    stage_y: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    stage_z: Mapped[Optional[float]] = mapped_column(Float, nullable=True)
    # For scanner files: "path#x,y,w,h" of the tile in the source image.
    tile: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    um_per_px: Mapped[float] = mapped_column(Float)
    quality: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON, nullable=True)
    skipped_reason: Mapped[Optional[str]] = mapped_column(String(100), nullable=True)
    image_path: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    width: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    height: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    n_counted: Mapped[int] = mapped_column(Integer, default=0)
    # Software, model and settings that analysed the field (daemon.provenance); None when skipped.
    method: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON(none_as_null=True),
                                                              nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    slide: Mapped[Slide] = relationship(back_populates="fields")
    cells: Mapped[list["Cell"]] = relationship(
        back_populates="field", order_by="Cell.index", cascade="all, delete-orphan",
        passive_deletes=True,
    )


class Cell(Base):
    __tablename__ = "cells"
    __table_args__ = (UniqueConstraint("field_id", "index", name="uq_cell_field_index"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    field_id: Mapped[int] = mapped_column(ForeignKey("fields.id", ondelete="CASCADE"), index=True)
    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"), index=True)
    # Position of the cell in its field's list from the pipeline.
    index: Mapped[int] = mapped_column(Integer)
    x: Mapped[float] = mapped_column(Float)
    y: Mapped[float] = mapped_column(Float)
    box: Mapped[list[Any]] = mapped_column(JSON)
    crop_path: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    # The machine's call: first (before guidance) and final.
    first_label: Mapped[str] = mapped_column(String(50))
    label: Mapped[str] = mapped_column(String(50), index=True)
    confidence: Mapped[float] = mapped_column(Float)
    guided: Mapped[bool] = mapped_column(Boolean, default=False)
    # Index (within the same field) of the cell this one duplicates; such cells are not counted.
    duplicate_of: Mapped[Optional[int]] = mapped_column(Integer, nullable=True)
    duplicate_reason: Mapped[Optional[str]] = mapped_column(String(200), nullable=True)
    needs_review: Mapped[bool] = mapped_column(Boolean, default=False)
    # A reviewer's decision; the final class is reviewed_label when set, else label.
    reviewed_label: Mapped[Optional[str]] = mapped_column(String(50), nullable=True)
    excluded: Mapped[bool] = mapped_column(Boolean, default=False)
    exclude_reason: Mapped[Optional[str]] = mapped_column(String(100), nullable=True)
    added_by: Mapped[Optional[str]] = mapped_column(String(100), nullable=True)

    field: Mapped[Field] = relationship(back_populates="cells")

    @hybrid_property
    def flag_open(self) -> bool:
        """Flagged by the machine for review and not yet answered by a reviewer (confirmed,
        moved or excluded); sign-off waits for these (``review.require_flags_checked``).
        Also a SQL condition: ``select(...).where(Cell.flag_open)``."""
        return bool(self.needs_review and self.reviewed_label is None and not self.excluded
                    and self.duplicate_of is None)

    @flag_open.inplace.expression
    @classmethod
    def _flag_open_sql(cls) -> ColumnElement[bool]:
        return and_(cls.needs_review.is_(True), cls.reviewed_label.is_(None),
                    cls.excluded.is_(False), cls.duplicate_of.is_(None))


class Count(Base):
    """The machine's running count per slide and class, updated with each field's commit."""

    __tablename__ = "counts"

    slide_id: Mapped[int] = mapped_column(
        ForeignKey("slides.id", ondelete="CASCADE"), primary_key=True
    )
    class_name: Mapped[str] = mapped_column(String(50), primary_key=True)
    n: Mapped[int] = mapped_column(Integer, default=0)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(100), unique=True)
    password_hash: Mapped[str] = mapped_column(Text)
    # "technician" or "supervisor"
    role: Mapped[str] = mapped_column(String(20))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Bumped at logout and at a new password: session cookies carry it, and an older one ends.
    session_epoch: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Review(Base):
    """A sign-off or a reopening of a slide, with the counts before and after review and, for a
    sign-off, the report it issued."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    slide_id: Mapped[int] = mapped_column(ForeignKey("slides.id", ondelete="CASCADE"), index=True)
    username: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(20))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    counts_before: Mapped[dict[str, Any]] = mapped_column(JSON)
    counts_after: Mapped[dict[str, Any]] = mapped_column(JSON)
    note: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    # A sign-off's report as issued (daemon.report.issued_report): a reprint says what the
    # signed one said, whatever the config has become since.
    report: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON(none_as_null=True),
                                                            nullable=True)
    # When its report (a sign-off) or withdrawal notice (a reopening) was written to
    # review.export_dir (or found to have nothing to send); None: not yet. An exporter
    # takes a row on by setting export_claimed_at; a claim older than EXPORT_CLAIM_S was
    # left by an exporter that died, and is taken again.
    exported_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True),
                                                           nullable=True)
    export_claimed_at: Mapped[Optional[datetime]] = mapped_column(DateTime(timezone=True),
                                                                 nullable=True)


class AuditEvent(Base):
    """Every change a person makes: who, when, what, before and after."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    username: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(50))
    slide_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("slides.id", ondelete="CASCADE"), nullable=True, index=True
    )
    cell_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("cells.id", ondelete="CASCADE"), nullable=True
    )
    before: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON, nullable=True)
    after: Mapped[Optional[dict[str, Any]]] = mapped_column(JSON, nullable=True)


class ScannedFile(Base):
    """A file seen in a watched scanner folder, keyed by content hash so it is processed once."""

    __tablename__ = "scanned_files"

    id: Mapped[int] = mapped_column(primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int] = mapped_column(BigInteger)  # whole-slide files pass 2 GiB
    # "pending", "processing", "done" or "quarantined"
    state: Mapped[str] = mapped_column(String(20), index=True)
    slide_id: Mapped[Optional[int]] = mapped_column(
        ForeignKey("slides.id", ondelete="SET NULL"), nullable=True
    )
    error: Mapped[Optional[str]] = mapped_column(Text, nullable=True)
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
