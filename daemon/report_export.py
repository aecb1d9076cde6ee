"""Issued reports out to the laboratory's systems: each sign-off's report, a notice for
each reopening that withdraws one, and one when a slide withdrawn so is then cancelled (no
amended report will follow), written into a folder the LIS (or EMR interface engine)
watches — the way most instruments hand results over.

Files are ``<slide>-<slide id>-issue<N>.<fmt>`` (the formats in ``review.export_formats``;
the id keeps two slides whose names differ only in characters a file name cannot hold apart),
``…-issue<N>-withdrawn.json`` and ``…-issue<N>-cancelled.json``. An amended report is a new issue, so no file is ever
replaced by other content; each appears whole (``store.write_whole``). The report is the one
kept at the sign-off, without a "printed" time, so writing the same issue again gives the
same result.

Each sign-off or reopening is claimed before its files are written (one exporter per row,
however many review-app workers and timers run), marked exported only once they are written,
and given back if writing fails — or taken again when its exporter died holding it — so it
goes out at the next run: after each sign-off and reopening, at the review app's start, or by
``marrowcount export-reports``. One item that cannot be written (a name too long for the
share) is logged and skipped; the rest go on. Exporting starts a day before the first run
that finds ``review.export_dir`` set (recorded in the store's data folder): a laboratory's
earlier results are sent only when asked for (``export-reports --since``), and results
waiting while the folder was away are never dropped.
"""

from __future__ import annotations

import json
import logging
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update

from daemon.case import parse_case
from daemon.models import Review, Slide, utcnow
from daemon.report import file_safe, freeze_report, issued_report, iso_time, save_report
from daemon.store import Store, write_whole
from pipeline.errors import MarrowError

log = logging.getLogger("marrowcount.export")

EXPORT_CLAIM_S = 900
"""A claim older than this was left by an exporter that died; another takes the row."""
SINCE_FILE = "export-since.txt"
"""In the store's data folder: when exporting began (sign-offs before it are not sent)."""


class ExportError(MarrowError):
    """The export folder cannot be reached or written; nothing more was exported."""


class _NothingToSend(MarrowError):
    """A sign-off that can never be exported (reopened before its report was kept)."""


@dataclass(frozen=True)
class Exported:
    slide: str
    issue: int
    kind: str  # "report", "withdrawn" or "cancelled"
    paths: tuple[Path, ...]


@dataclass(frozen=True)
class ExportRun:
    exported: list[Exported]
    failed: list[str]  # one line per sign-off or reopening left for the next run, and why


def export_reports(store: Store, cfg: Any, since: datetime | None = None) -> ExportRun:
    """Write every sign-off's report and every withdrawal not yet exported, oldest first:
    those made since exporting began or, with ``since``, since then. Does nothing without
    ``review.export_dir``. Raises ExportError when the folder cannot be used at all."""
    if cfg.review.export_dir is None:
        return ExportRun([], [])
    folder = cfg.resolve(cfg.review.export_dir)
    # Exporting begins at the first attempt, not the first success: sign-offs made while
    # the folder was still missing or not writable are owed to the LIS once it works.
    began = _export_began(store)
    probe = folder / f".marrowcount-probe-{uuid.uuid4().hex}"  # one per exporter
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok\n")
        probe.unlink()
    except OSError as exc:
        raise ExportError(f"export folder {folder}: {exc.strerror or exc}") from None
    cutoff = since or began
    with store.session() as s:
        todo = list(s.execute(
            select(Review.id, Review.slide_id, Review.action)
            .where(Review.exported_at.is_(None), Review.at >= cutoff,
                   Review.action.in_(("sign", "reopen", "cancel")))
            .order_by(Review.id)))
    run = ExportRun([], [])
    # A slide's results go out in order: once one of its items waits (another exporter has
    # it, or it failed), its later ones wait too; a withdrawal or issue 2 had reached the LIS
    # before the issue 1 an interrupted exporter had claimed.
    held: set[int] = set()
    for review_id, slide_id, action in todo:
        if slide_id in held:
            continue
        stale = utcnow() - timedelta(seconds=EXPORT_CLAIM_S)
        with store.session() as s:
            claimed = s.execute(update(Review).where(
                Review.id == review_id, Review.exported_at.is_(None),
                or_(Review.export_claimed_at.is_(None), Review.export_claimed_at < stale))
                .values(export_claimed_at=utcnow())).rowcount
        if not claimed:
            held.add(slide_id)  # another exporter has it
            continue
        try:
            item = _export_one(store, cfg, folder, review_id, slide_id, action)
        except _NothingToSend as exc:  # marked done: said once, not retried
            _mark_exported(store, review_id)
            run.failed.append(f"slide {slide_id} {action} (review {review_id}): {exc}")
            log.warning("not exported: %s", exc)
            continue
        except Exception as exc:  # this one waits; the others go on
            with store.session() as s:
                s.execute(update(Review).where(Review.id == review_id)
                          .values(export_claimed_at=None))
            held.add(slide_id)
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            run.failed.append(f"slide {slide_id} {action} (review {review_id}): {why}")
            log.error("not exported, tried again at the next run: slide %d %s: %s",
                      slide_id, action, why)
            continue
        _mark_exported(store, review_id)
        if item is not None:
            run.exported.append(item)
            log.info("exported %s issue %d (%s): %s", item.slide, item.issue, item.kind,
                     ", ".join(p.name for p in item.paths))
    return run


def _mark_exported(store: Store, review_id: int) -> None:
    with store.session() as s:
        s.execute(update(Review).where(Review.id == review_id).values(exported_at=utcnow()))


def _export_one(store: Store, cfg: Any, folder: Path, review_id: int, slide_id: int,
                action: str) -> Exported | None:
    with store.session() as s:
        slide = s.get(Slide, slide_id)
        signs = list(s.scalars(select(Review).where(
            Review.slide_id == slide_id, Review.action == "sign", Review.id <= review_id)
            .order_by(Review.id)))
        issue = len(signs)  # a reopening withdraws the issue signed last before it
        name, case = slide.name, parse_case(slide.case_info).model_dump(mode="json")
        stem = f"{file_safe(name)}-{slide_id}-issue{issue}"
        ended = s.get(Review, review_id) if action in ("reopen", "cancel") else None
        if ended is not None:
            by = "reopened" if action == "reopen" else "cancelled"
            notice = {"notice": "withdrawn" if action == "reopen" else "cancelled",
                      "slide": name, "slide_id": slide_id, "case": case, "issue": issue,
                      f"{by}_by": ended.username, f"{by}_at": iso_time(ended.at),
                      "reason": ended.note}
            if action == "cancel":  # after the withdrawal: the LIS stops waiting
                notice["amended_report_follows"] = False
            kept = signs[-1].report is not None if signs else False
    if ended is not None:
        if issue == 0:
            return None  # reopened before any sign-off was recorded: nothing to withdraw
        if not kept:
            log.warning("%s: issue %d is withdrawn, but its report was never kept or sent",
                        name, issue)
        text = json.dumps(notice, indent=2) + "\n"
        path = write_whole(folder / f"{stem}-{notice['notice']}.json",
                           lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return Exported(name, issue, notice["notice"], (path,))
    if signs[-1].report is None:
        # Signed, but the report was not kept then (e.g. the database was busy): keep it now,
        # unless the slide has been reopened or signed again since: then it never will be.
        kept = freeze_report(store, slide_id, cfg)
        if kept is None or kept["issue"]["number"] != issue:
            raise _NothingToSend(f"issue {issue} of {name!r} was reopened before its report "
                                 "was kept; its counts are in the review history only")
    rep = issued_report(store, slide_id, cfg, issue)
    # The file is the report as issued, whenever it goes: a late one is not re-rendered as
    # "superseded" (its withdrawal notice follows it).
    rep.pop("printed_at", None)
    rep.pop("superseded", None)
    paths = tuple(save_report(rep, fmt, folder / f"{stem}.{fmt}")
                  for fmt in cfg.review.export_formats)
    return Exported(name, issue, "report", paths)


def _export_began(store: Store) -> datetime:
    """Since when this store exports: a day before its first run (which a sign-off starts,
    after it was made), recorded then."""
    marker = store.data_dir / SINCE_FILE
    try:
        return datetime.fromisoformat(marker.read_text().strip())
    except (OSError, ValueError):
        began = datetime.now(timezone.utc) - timedelta(days=1)
        write_whole(marker, lambda tmp: tmp.write_text(began.isoformat() + "\n"))
        return began


class BackgroundExporter:
    """Runs ``export_reports`` on a thread of its own whenever ``kick`` is called, so that a
    share that hangs delays the export, never a sign-off or the review app's start. Kicks
    during a run make one more run; failures are logged."""

    def __init__(self, store: Store, cfg: Any) -> None:
        self._store, self._cfg = store, cfg
        self._wanted = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def kick(self) -> None:
        if self._cfg.review.export_dir is None:
            return
        with self._lock:
            self._idle.clear()
            self._wanted.set()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="marrowcount-export",
                                                daemon=True)
                self._thread.start()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every kick so far has been served (tests, shutdown)."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            try:
                export_reports(self._store, self._cfg)
            except Exception:
                log.exception("issued reports could not be exported now; they go at the next "
                              "sign-off, start of the review app or `marrowcount "
                              "export-reports`")
            with self._lock:
                if not self._wanted.is_set():
                    self._idle.set()
