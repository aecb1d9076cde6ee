"""The SQLAlchemy store: slides, fields, cells, counts, reviews and audit events.

One ``Store`` wraps a database URL (SQLite by default, PostgreSQL for a lab whose instruments
share one store) and a data directory for field images and cell crops. Opening it runs the
Alembic migrations; a SQLite database runs in WAL mode with foreign keys on.

``commit_field`` is the heart of crash safety. A field's files are first written into a
private staging folder, then the field, its cells and the slide's running counts are
committed in one transaction, and only then is the staging folder renamed into place. A kill
at any point leaves either nothing (the staging folder is swept at the next open) or a
committed field whose staging folder the sweep finishes moving. ``(slide, index)`` keys a
field, so committing it twice is a no-op.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from pydantic import Field as PydField
from sqlalchemy import and_, create_engine, event, exists, func, insert, inspect, select, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, defer, sessionmaker

from daemon.models import (
    SLIDE_STATUSES,
    AuditEvent,
    Cell,
    Count,
    Field,
    Review,
    Slide,
    utcnow,
)
from pipeline.errors import MarrowError
from pipeline.params import Params

if TYPE_CHECKING:
    from daemon.case import CaseInfo
    from drivers.acquisition import FieldResult

log = logging.getLogger("marrowcount.store")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
RED_CELLS = "red_cells_um"
"""``Field.quality`` key of the pixel-size check: the field's isolated red-cell diameters in
µm, measured through the stated pixel size (``pipeline.calibrate.check_stated_scale``)."""
SQLITE_MAGIC = b"SQLite format 3\x00"
STAGING = ".staging"

# Which status may follow which. "acquiring" -> "queued" lets an operator requeue a slide.
TRANSITIONS: dict[str, tuple[str, ...]] = {
    "queued": ("acquiring", "failed"),
    "acquiring": ("awaiting_review", "failed", "queued"),
    "awaiting_review": ("signed", "queued", "failed"),  # failed: cancelled unsigned
    "signed": ("awaiting_review",),
    "failed": ("queued",),
}


class StoreError(MarrowError):
    """A database or data directory that cannot be opened, migrated or written."""


class StoreParams(Params):
    """The ``store:`` config section (defaults in config/default.yaml)."""

    url: str = PydField(description="SQLAlchemy URL; a relative SQLite path is under the repo root")
    data_dir: str = PydField(description="folder for field images and cell crops")
    save_field_images: bool = PydField(description="keep each field image as PNG beside crops")
    busy_timeout_s: float = PydField(gt=0, description="how long a writer waits for a lock")


WriteFile = Callable[[Path, bytes], None]


def write_file(path: Path, data: bytes) -> None:
    """The one place the store writes bytes to disk (a test may wrap it to inject ENOSPC).

    The data is on disk when this returns (fsync), so a power cut after the field's commit
    cannot leave a counted cell whose crop is empty."""
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def write_whole(path: Path, write: Callable[[Path], None]) -> Path:
    """Make ``path`` appear whole or not at all: ``write`` fills a temporary file of its own
    beside it (two writers never share one), which is flushed to disk and renamed over
    ``path``. A reader (a folder the LIS watches, the review page) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fsync_dir(path: Path) -> None:
    """Make the names in ``path`` (new files, a rename into it) survive a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Progress:
    """Where a slide's counting stands: the last committed field and the counted total."""

    last_index: int | None
    n_fields: int
    counted: int

    @property
    def next_index(self) -> int:
        return 0 if self.last_index is None else self.last_index + 1


class Store:
    """Open (and migrate) the database at ``url`` with files under ``data_dir``.

    Raises StoreError when the database cannot be reached, is not a SQLite file, holds
    tables that are not a marrowcount store, or is from a newer version. With ``existing``, a
    SQLite file that is not there is an error too (a command that only reads the store must
    not leave an empty one behind at a mistyped path).
    """

    def __init__(
        self,
        url: str,
        data_dir: str | Path,
        *,
        save_field_images: bool = True,
        busy_timeout_s: float = 30.0,
        writer: WriteFile = write_file,
        existing: bool = False,
    ) -> None:
        if existing:
            _require_sqlite_file(url)
        self.url = url
        self.data_dir = Path(data_dir)
        self.save_field_images = save_field_images
        self._write = writer
        # Crops are PNG-encoded and written in parallel: cv2 and file writes release the GIL.
        self._pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1),
                                        thread_name_prefix="marrowcount-crops")
        self._host = socket.gethostname()
        self._busy_timeout_s = busy_timeout_s
        self.engine = _engine(url, busy_timeout_s)
        try:
            self._migrate()
        except StoreError:
            self.engine.dispose()
            raise
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            (self.data_dir / STAGING).mkdir(exist_ok=True)
        except OSError as exc:
            raise StoreError(f"data directory {self.data_dir}: {exc.strerror}") from None
        self.sweep_staging()

    @classmethod
    def from_params(cls, params: StoreParams, resolve: Callable[[str], Path],
                    existing: bool = False) -> "Store":
        """A store from the ``store:`` config section; relative paths go through ``resolve``."""
        return cls(
            resolve_url(params.url, resolve),
            resolve(params.data_dir),
            save_field_images=params.save_field_images,
            busy_timeout_s=params.busy_timeout_s,
            existing=existing,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.engine.dispose()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sessions -------------------------------------------------------------------------

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A SQLAlchemy Session that commits when the block succeeds and rolls back otherwise."""
        s = self._sessions()
        try:
            yield s
            s.commit()
        except BaseException:
            s.rollback()
            raise
        finally:
            s.close()

    # -- migrations -----------------------------------------------------------------------

    def _migration_engine(self) -> Engine:
        """The engine migrations run on. SQLite: Python's sqlite3 commits each CREATE /
        ALTER on its own, so a migration killed part way left tables without their version
        row and every later start failed on "table slides already exists"; one explicit
        transaction holds the whole migration (SQLAlchemy's pysqlite recipe), so it applies
        completely or not at all. Foreign keys are off meanwhile, as SQLite asks for table
        rebuilds (alembic batch mode): a rebuilt ``slides`` table is dropped first, and with
        them on that drop cascades to every review and audit event (refused by the
        append-only triggers, or, without them, erased); they are checked after."""
        if self.engine.dialect.name != "sqlite":
            return self.engine
        engine = _engine(self.url, self._busy_timeout_s)

        def _connect(dbapi_conn: Any, _rec: Any) -> None:
            dbapi_conn.execute("PRAGMA foreign_keys=OFF")  # after _engine's pragmas: wins
            dbapi_conn.isolation_level = None

        event.listen(engine, "connect", _connect)
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine

    def _migrate(self) -> None:
        from alembic import command
        from alembic.config import Config as AlembicConfig
        from alembic.script import ScriptDirectory

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        head = ScriptDirectory.from_config(cfg).get_current_head()
        engine = self._migration_engine()
        try:
            with engine.begin() as conn:
                tables = set(inspect(conn).get_table_names())
                current = None
                if "alembic_version" in tables:
                    current = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
                elif tables - {"sqlite_sequence"}:
                    raise StoreError(
                        f"{_safe_url(self.url)} holds tables that are not a marrowcount store "
                        f"({', '.join(sorted(tables)[:5])}); refusing to touch it"
                    )
                if current is not None and current != head:
                    known = {s.revision for s in ScriptDirectory.from_config(cfg).walk_revisions()}
                    if current not in known:
                        raise StoreError(
                            f"{_safe_url(self.url)} is at schema revision {current}, which this "
                            "version of marrowcount does not know (newer?); refusing to touch it"
                        )
                if current != head:
                    cfg.attributes["connection"] = conn
                    command.upgrade(cfg, "head")
                    if conn.dialect.name == "sqlite" and (
                            bad := conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()):
                        raise StoreError(f"migrating {_safe_url(self.url)} to {head} would "
                                         f"break {len(bad)} references (first: {bad[0]}); "
                                         "nothing was changed")
                    log.info("store migrated to %s", head)
        except StoreError:
            raise
        except OperationalError as exc:
            raise StoreError(f"cannot open database {_safe_url(self.url)}: {_first_line(exc)}") from None
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot migrate database {_safe_url(self.url)}: {_first_line(exc)}") from None
        finally:
            if engine is not self.engine:
                engine.dispose()

    # -- slides ---------------------------------------------------------------------------

    def create_slide(
        self,
        name: str,
        source: str,
        source_ref: str,
        target: int,
        taxonomy: str,
        *,
        um_per_px: float | None = None,
        plan: dict[str, Any] | None = None,
        case: "CaseInfo | None" = None,
    ) -> int:
        """Queue a new slide; returns its id. Raises StoreError if ``name`` is taken."""
        if source not in ("virtual", "microscope", "folder"):
            raise StoreError(f"unknown slide source {source!r}")
        if target <= 0:
            raise StoreError(f"target must be a positive number of cells, got {target}")
        try:
            with self.session() as s:
                slide = Slide(
                    name=name,
                    source=source,
                    source_ref=source_ref,
                    status="queued",
                    target=int(target),
                    taxonomy=taxonomy,
                    um_per_px=um_per_px,
                    plan=_plain(plan) if plan is not None else None,
                    case_info=case.stored() if case is not None else None,
                )
                s.add(slide)
                s.flush()
                return slide.id
        except IntegrityError:
            raise StoreError(f"a slide named {name!r} already exists (a rescan or a second "
                             f"try: give it another name, e.g. --name '{name} (2)')") from None

    def slide(self, slide_id_or_name: int | str) -> Slide:
        """One slide by id or name (a detached row). Raises StoreError if there is none."""
        with self.session() as s:
            if isinstance(slide_id_or_name, int) or str(slide_id_or_name).isdigit():
                row = s.get(Slide, int(slide_id_or_name))
                if row is None and not isinstance(slide_id_or_name, int):
                    row = s.scalar(select(Slide).where(Slide.name == str(slide_id_or_name)))
            else:
                row = s.scalar(select(Slide).where(Slide.name == slide_id_or_name))
            if row is None:
                raise StoreError(f"no slide {slide_id_or_name!r} in the store "
                                 f"{_safe_url(self.url)}")
            return row

    def slides(self, statuses: Iterable[str] | None = None, *, plan: bool = True
               ) -> list[Slide]:
        """Slides (detached rows), oldest first, optionally only those in ``statuses``.
        ``plan=False`` leaves each field plan unread (reading it then raises): a scanner
        slide's plan runs to tens of kB, and listing years of them had taken seconds."""
        with self.session() as s:
            q = select(Slide).order_by(Slide.id)
            if not plan:
                q = q.options(defer(Slide.plan, raiseload=True))
            if statuses is not None:
                q = q.where(Slide.status.in_(list(statuses)))
            return list(s.scalars(q))

    def set_status(
        self,
        slide_id: int,
        status: str,
        *,
        expect: str | None = None,
        error: str | None = None,
        stopped_because: str | None = None,
        plan: dict[str, Any] | None = None,
        worker: str | None = None,
    ) -> bool:
        """Move a slide to ``status`` if the transition is allowed.

        With ``expect`` the move only happens if the slide is in that status now (a
        compare-and-set, so two daemons never claim the same slide); returns whether it moved.
        """
        if status not in SLIDE_STATUSES:
            raise StoreError(f"unknown slide status {status!r}")
        with self.session() as s:
            slide = s.get(Slide, slide_id)
            if slide is None:
                raise StoreError(f"no slide {slide_id} in the store")
            current = expect if expect is not None else slide.status
            if status != current and status not in TRANSITIONS[current]:
                raise StoreError(f"slide {slide.name!r} cannot go from {current} to {status}")
            values: dict[str, Any] = {"status": status, "error": error}
            now = utcnow()
            if status == "acquiring" and slide.started_at is None:
                values["started_at"] = now
            if status in ("awaiting_review", "failed"):
                values["finished_at"] = now
            if stopped_because is not None:
                values["stopped_because"] = stopped_because
            if plan is not None:
                values["plan"] = _plain(plan)
            if worker is not None:
                values["worker"] = worker
            res = s.execute(
                update(Slide)
                .where(Slide.id == slide_id, Slide.status == current)
                .values(**values)
            )
            return res.rowcount == 1

    def cancel(self, slide_id: int, expect: str, who: str, reason: str) -> bool:
        """End a slide as ``failed`` ("cancelled by WHO: REASON") if it is ``expect`` now,
        audited as ``cancel`` in the same transaction; returns whether it moved. A counted
        slide keeps when and why counting ended (the audit's ``before`` has them too). One
        signed before (then reopened) gets a ``cancel`` review: the LIS was sent that issue
        and its withdrawal, and is now told no amended report will follow."""
        if "failed" not in TRANSITIONS[expect]:
            raise StoreError(f"a {expect.replace('_', ' ')} slide cannot be cancelled")
        with self.session() as s:
            slide = s.get(Slide, slide_id)
            if slide is None:
                raise StoreError(f"no slide {slide_id} in the store")
            before = {"status": slide.status, "error": slide.error,
                      "stopped_because": slide.stopped_because,
                      "finished_at": (slide.finished_at.isoformat(timespec="seconds")
                                      if slide.finished_at else None)}
            values: dict[str, Any] = {"status": "failed",
                                      "error": f"cancelled by {who}: {reason}"}
            if expect != "awaiting_review":
                values |= {"finished_at": utcnow(), "stopped_because": "failed"}
            if s.execute(update(Slide).where(Slide.id == slide_id, Slide.status == expect)
                         .values(**values)).rowcount != 1:
                return False
            s.add(AuditEvent(username=who, action="cancel", slide_id=slide_id,
                             before=before, after={"status": "failed", "reason": reason}))
            if s.scalar(select(Review.id).where(Review.slide_id == slide_id,
                                                Review.action == "sign").limit(1)):
                s.add(Review(slide_id=slide_id, username=who, action="cancel",
                             counts_before={}, counts_after={}, note=reason))
        return True

    def note_error(self, slide_id: int, error: str | None) -> None:
        """Record (or clear) a slide's last error without changing its status."""
        with self.session() as s:
            s.execute(update(Slide).where(Slide.id == slide_id).values(error=error))

    def claim_next(self, worker: str) -> Slide | None:
        """Atomically move the oldest queued slide to ``acquiring`` for ``worker``; return it."""
        for slide in self.slides(["queued"]):
            claimed = self.claim(slide.id, worker)
            if claimed is not None:
                return claimed
        return None

    def claim(self, slide_id: int, worker: str) -> Slide | None:
        """Claim one queued slide for ``worker``; None if it is not queued (any more)."""
        if self.set_status(slide_id, "acquiring", expect="queued", worker=worker):
            return self.slide(slide_id)
        return None

    def set_plan(self, slide_id: int, plan: dict[str, Any], um_per_px: float | None) -> None:
        """Freeze a slide's field plan (and pixel size) so a resume follows the same fields."""
        with self.session() as s:
            s.execute(update(Slide).where(Slide.id == slide_id)
                      .values(plan=_plain(plan), um_per_px=um_per_px))

    def audit(self, username: str, action: str, slide_id: int | None = None, *,
              cell_id: int | None = None, before: dict[str, Any] | None = None,
              after: dict[str, Any] | None = None) -> None:
        with self.session() as s:
            s.add(AuditEvent(username=username, action=action, slide_id=slide_id,
                             cell_id=cell_id, before=_plain(before), after=_plain(after)))

    # -- fields ---------------------------------------------------------------------------

    def commit_field(self, slide_id: int, fld: "FieldResult",
                     method: dict[str, Any] | None = None) -> bool:
        """Store one field with its cells, crops and the slide's running counts, atomically.
        ``method``: what analysed it (``daemon.provenance.analysis_method``), kept with it.

        Returns False (and changes nothing) if the slide already has a field with this index.
        Raises OSError (e.g. ENOSPC) if its files cannot be written; nothing is then kept.
        """
        if self._field_exists(slide_id, fld.index):
            return False
        rel = _field_dir(slide_id, fld.index)
        stage = self.data_dir / STAGING / (
            f"s{slide_id}-f{fld.index}-{self._host}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        )
        try:
            stage.mkdir()
            files = self._write_field_files(stage, fld)
            committed = self._insert_field(slide_id, fld, rel, files, method)
            if committed:
                _move_into_place(stage, self.data_dir / rel)
            return committed
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)

    def _field_exists(self, slide_id: int, index: int) -> bool:
        with self.session() as s:
            return s.scalar(
                select(Field.id).where(Field.slide_id == slide_id, Field.index == index)
            ) is not None

    def _write_field_files(self, stage: Path, fld: "FieldResult") -> dict[str, str]:
        """Write crops (and the field image) into ``stage``; returns {key: file name}.

        Every write has finished when this returns or raises (the first error, e.g. ENOSPC).
        """
        jobs: dict[str, tuple[str, Callable[[], bytes]]] = {}
        for c in fld.cells:
            if c.crop is not None:
                jobs[f"cell{c.index}"] = (f"c{c.index:04d}.png", lambda c=c: _png(c.crop))
        if self.save_field_images and fld.image is not None:
            jobs["field"] = ("field.png", lambda: _png(fld.image, fld.um_per_px))

        def job(name: str, encode: Callable[[], bytes]) -> None:
            self._write(stage / name, encode())

        futures = [self._pool.submit(job, name, enc) for name, enc in jobs.values()]
        wait(futures)
        for f in futures:
            f.result()  # re-raise the first failure
        _fsync_dir(stage)
        return {key: name for key, (name, _) in jobs.items()}

    def _insert_field(
        self, slide_id: int, fld: "FieldResult", rel: Path, files: dict[str, str],
        method: dict[str, Any] | None,
    ) -> bool:
        counts: dict[str, int] = {}
        for c in fld.cells:
            if c.duplicate_of is None:
                counts[c.label] = counts.get(c.label, 0) + 1
        try:
            with self.session() as s:
                h, w = (fld.image.shape[:2] if fld.image is not None else (None, None))
                row = Field(
                    slide_id=slide_id,
                    index=int(fld.index),
                    stage_x=_num(fld.stage_x),
                    stage_y=_num(fld.stage_y),
                    stage_z=_num(fld.stage_z),
                    tile=fld.tile,
                    um_per_px=float(fld.um_per_px),
                    quality=_plain(dict(fld.quality or {})),
                    skipped_reason=(fld.skipped_reason or None) and fld.skipped_reason[:100],
                    image_path=str(rel / files["field"]) if "field" in files else None,
                    width=None if w is None else int(w),
                    height=None if h is None else int(h),
                    n_counted=int(fld.n_counted),
                    method=method,
                )
                s.add(row)
                s.flush()
                if fld.cells:
                    s.execute(insert(Cell), [_cell_row(c, row.id, slide_id, rel, files)
                                             for c in fld.cells])
                for label, n in sorted(counts.items()):
                    res = s.execute(
                        update(Count)
                        .where(Count.slide_id == slide_id, Count.class_name == label)
                        .values(n=Count.n + n)
                    )
                    if res.rowcount == 0:
                        s.add(Count(slide_id=slide_id, class_name=label, n=n))
                s.flush()
            return True
        except IntegrityError as exc:
            if self._field_exists(slide_id, fld.index):
                return False  # another writer committed this field first
            raise StoreError(f"field {fld.index} of slide {slide_id}: {_first_line(exc)}") from None

    def sweep_staging(self) -> int:
        """Finish or discard staging folders left by processes that died; returns how many.

        A staging folder whose field is committed is moved into place (the process died
        between commit and rename); any other is deleted (it died before commit). Folders of
        processes still alive on this host, or from other hosts, are left alone.
        """
        root = self.data_dir / STAGING
        done = 0
        for stage in sorted(root.iterdir()) if root.is_dir() else []:
            parsed = _parse_stage(stage.name)
            if parsed is None:
                continue
            slide_id, index, host, pid = parsed
            if host != self._host or (pid != os.getpid() and _alive(pid)):
                continue
            if pid == os.getpid():
                continue
            if self._field_exists(slide_id, index):
                _move_into_place(stage, self.data_dir / _field_dir(slide_id, index))
            else:
                shutil.rmtree(stage, ignore_errors=True)
            done += 1
        if done:
            log.info("swept %d staging folder(s) left by an interrupted run", done)
        return done

    # -- counts ---------------------------------------------------------------------------

    def counts(self, slide_id: int) -> dict[str, int]:
        """The machine's running count per class (duplicates left out; non-leukocytes in)."""
        with self.session() as s:
            rows = s.execute(
                select(Count.class_name, Count.n).where(Count.slide_id == slide_id)
            ).all()
        return {name: n for name, n in rows if n}

    def reviewed_counts(self, slide_id: int) -> dict[str, int]:
        """Counts after review: a reviewer's label wins, excluded cells and duplicates drop out."""
        final = func.coalesce(Cell.reviewed_label, Cell.label)
        with self.session() as s:
            rows = s.execute(
                select(final, func.count())
                .where(Cell.slide_id == slide_id, Cell.duplicate_of.is_(None),
                       Cell.excluded.is_(False))
                .group_by(final)
            ).all()
        return {name: int(n) for name, n in rows}

    def progress(self, slide_id: int) -> Progress:
        """Last committed field index and counted total, from which a resume continues."""
        return self.progress_of([slide_id])[slide_id]

    def progress_of(self, slide_ids: Sequence[int]) -> dict[int, Progress]:
        """``progress`` of each slide, in one query."""
        out = {sid: Progress(last_index=None, n_fields=0, counted=0) for sid in slide_ids}
        if not out:
            return out
        with self.session() as s:
            for sid, last, n, counted in s.execute(
                    select(Field.slide_id, func.max(Field.index), func.count(Field.id),
                           func.coalesce(func.sum(Field.n_counted), 0))
                    .where(Field.slide_id.in_(list(out))).group_by(Field.slide_id)):
                out[sid] = Progress(last_index=last, n_fields=int(n), counted=int(counted))
        return out

    def fields(self, slide_id: int) -> list[Field]:
        with self.session() as s:
            return list(s.scalars(select(Field).where(Field.slide_id == slide_id)
                                  .order_by(Field.index)))

    def red_cells(self, slide_ids: Sequence[int]
                  ) -> dict[int, tuple[list[float], int, float | None]]:
        """The pixel-size check's measurements per slide, in one query: red-cell diameters (µm
        through the stated pixel size) pooled over the slide's measured fields, how many
        fields were measured, and their stated pixel size (the first measured field's)."""
        out: dict[int, tuple[list[float], int, float | None]] = {
            sid: ([], 0, None) for sid in slide_ids}
        if not out:
            return out
        with self.session() as s:
            for sid, quality, um in s.execute(
                    select(Field.slide_id, Field.quality, Field.um_per_px)
                    .where(Field.slide_id.in_(list(out))).order_by(Field.slide_id, Field.index)):
                if quality and RED_CELLS in quality:
                    pooled, n, stated = out[sid]
                    pooled += [float(d) for d in quality[RED_CELLS]]
                    out[sid] = (pooled, n + 1, float(um) if stated is None else stated)
        return out

    def cells(self, slide_id: int) -> list[Cell]:
        with self.session() as s:
            return list(s.scalars(select(Cell).where(Cell.slide_id == slide_id)
                                  .order_by(Cell.field_id, Cell.index)))

    def path(self, rel: str) -> Path:
        """The absolute path of a stored image path (relative to the data directory)."""
        return self.data_dir / rel

    def locations(self, rel: str) -> list[Path]:
        """Where the stored file ``rel`` may be now: its place and, for a field's file, the
        staging folder of a field committed a moment ago (its rename into place follows the
        commit). Empty for a path that would leave the data directory."""
        p = PurePosixPath(rel)
        if p.is_absolute() or ".." in p.parts:
            return []
        out = [self.data_dir / p]
        if len(p.parts) == 4 and p.parts[0] == "slides" and p.parts[1].isdigit() and (
                re.fullmatch(r"f\d+", p.parts[2])):
            out += sorted((self.data_dir / STAGING).glob(
                f"s{int(p.parts[1])}-f{int(p.parts[2][1:])}-*/{p.name}"))
        return out


# -- helpers -------------------------------------------------------------------------------


def resolve_url(url: str, resolve: Callable[[str], Path]) -> str:
    """Make a relative SQLite path absolute through ``resolve``; other URLs pass unchanged."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite" and u.database and u.database != ":memory:":
        return u.set(database=str(resolve(u.database))).render_as_string(hide_password=False)
    return url


def _require_sqlite_file(url: str) -> None:
    try:
        u = make_url(url)
    except Exception:
        return  # _engine says why
    db = u.database or ""
    if u.get_backend_name() == "sqlite" and db and db != ":memory:" and not Path(db).exists():
        raise StoreError(f"no store at {db}: it is made when the daemon first starts or a "
                         "slide is first submitted; are --config / store.url (or --db) right?")


def lock_slide(s: Session, slide_id: int) -> Slide | None:
    """The slide row, read afresh and locked until this transaction ends, so that a check
    of its status and the change made on it cannot interleave with another reviewer's.
    SELECT ... FOR UPDATE where the database has it; SQLite has not, and pysqlite opens the
    transaction only at the first write, so a no-op UPDATE comes first there: it takes the
    database's write lock (a second signer waits, then reads the slide signed)."""
    if s.get_bind().dialect.name == "sqlite":
        s.execute(update(Slide).where(Slide.id == slide_id).values(status=Slide.status)
                  .execution_options(synchronize_session=False))
    return s.scalar(select(Slide).where(Slide.id == slide_id).with_for_update()
                    .execution_options(populate_existing=True))


def _engine(url: str, busy_timeout_s: float) -> Engine:
    try:
        u = make_url(url)
    except Exception:
        raise StoreError(f"store url {url!r} is not a valid database URL") from None
    if u.get_backend_name() != "sqlite":
        try:
            return create_engine(u, pool_pre_ping=True)
        except Exception as exc:  # unknown dialect, missing driver
            raise StoreError(f"store url {_safe_url(url)}: {_first_line(exc)}") from None
    db = u.database or ""
    if db and db != ":memory:":
        path = Path(db)
        if path.is_dir():
            raise StoreError(f"{path} is a folder, not a SQLite database")
        if path.exists() and path.stat().st_size > 0:
            with open(path, "rb") as fh:
                if fh.read(16) != SQLITE_MAGIC:
                    raise StoreError(
                        f"{path} is not a SQLite database; refusing to open or overwrite it"
                    )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {path.parent}: {exc.strerror}") from None
    engine = create_engine(u, connect_args={"timeout": busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_conn: Any, _record: Any) -> None:
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed field survives a power cut too (NORMAL would only guarantee
        # that a lost last transaction is lost whole). One WAL fsync per field is cheap.
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        cur.close()

    return engine


def _cell_row(c: Any, field_id: int, slide_id: int, rel: Path, files: dict[str, str]) -> dict:
    name = files.get(f"cell{c.index}")
    return {
        "field_id": field_id,
        "slide_id": slide_id,
        "index": int(c.index),
        "x": float(c.x),
        "y": float(c.y),
        "box": [int(v) for v in c.box],
        "crop_path": str(rel / name) if name else None,
        "probabilities": {str(k): float(v) for k, v in c.probabilities.items()},
        "first_label": str(c.first_label),
        "label": str(c.label),
        "confidence": float(c.confidence),
        "guided": bool(c.guided),
        "duplicate_of": None if c.duplicate_of is None else int(c.duplicate_of),
        "duplicate_reason": None if c.duplicate_reason is None else str(c.duplicate_reason)[:200],
        "needs_review": bool(c.needs_review),
        "reviewed_label": None,
        "excluded": False,
        "exclude_reason": None,
        "added_by": None,
    }


def _png(rgb: np.ndarray, um_per_px: float | None = None) -> bytes:
    """Lossless PNG bytes of an RGB uint8 image; with ``um_per_px`` the pixel size is in pHYs.

    Crops use the SUB filter with run-length deflate: as small as the default settings and
    about 2.5× faster to encode, which is most of a field's commit time.
    """
    if um_per_px is not None:
        import io

        from PIL import Image

        buf = io.BytesIO()
        dpi = 25400.0 / float(um_per_px)
        Image.fromarray(np.ascontiguousarray(rgb)).save(
            buf, format="PNG", dpi=(dpi, dpi), compress_level=1
        )
        return buf.getvalue()
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]), _PNG_FAST)
    if not ok:
        raise OSError(errno.EIO, "PNG encoding failed")
    return data.tobytes()


_PNG_FAST = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB,
             cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]


def _move_into_place(stage: Path, final: Path) -> None:
    # Anything already at ``final`` is stale (a deleted slide whose id was reused): the
    # field was not in the database until the commit just made.
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(stage, final)
    _fsync_dir(final.parent)


def _field_dir(slide_id: int, index: int) -> Path:
    """A field's folder under the data directory (its crops and image)."""
    return Path("slides") / str(slide_id) / f"f{index:05d}"


def _parse_stage(name: str) -> tuple[int, int, str, int] | None:
    try:
        s, f, rest = name.split("-", 2)
        host, pid, _token = rest.rsplit("-", 2)
        return int(s[1:]), int(f[1:]), host, int(pid)
    except ValueError:
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


def _plain(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars and arrays become Python numbers and lists."""
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    return str(obj)


def failed_before(cutoff: datetime) -> Any:
    """SQL condition: the slide failed before ``cutoff``. A cancelled one counts from its
    cancel, not its ``finished_at``: one cancelled from review keeps when counting ended,
    and had left the queue, and been purgeable, the moment it was cancelled."""
    cancelled_since = exists().where(AuditEvent.slide_id == Slide.id,
                                     AuditEvent.action == "cancel", AuditEvent.at >= cutoff)
    return and_(Slide.status == "failed", Slide.finished_at < cutoff, ~cancelled_since)


def _first_line(exc: BaseException) -> str:
    return (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [""])[0]


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<invalid url>"


__all__: Sequence[str] = (
    "Progress", "Store", "StoreError", "StoreParams", "TRANSITIONS", "resolve_url", "write_file",
)
