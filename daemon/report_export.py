"""Issued reports out to the laboratory's systems: each sign-off's report, and a notice for
each reopening that withdraws one, written into a folder the LIS (or EMR interface engine)
watches — the way most instruments hand results over.

Files are ``<slide>-issue<N>.<fmt>`` (the formats in ``review.export_formats``) and
``<slide>-issue<N>-withdrawn.json``; an amended report is a new issue, so nothing is ever
overwritten with other content. Each file appears whole (written beside, then renamed). A
sign-off or reopening is marked exported only once all its files are written, so one that
failed (folder unmounted, disk full) goes out at the next sign-off, reopening, start of the
review app or ``marrowcount export-reports``; writing again the same issue gives the same
files. Enabling the folder does not send a laboratory's history: the automatic runs look back
``AUTO_EXPORT_DAYS``; ``export-reports --since`` sends older ones on purpose.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select, update

from daemon.case import parse_case
from daemon.models import Review, Slide, utcnow
from daemon.report import file_safe, iso_time, write_report
from daemon.store import Store
from pipeline.errors import MarrowError

log = logging.getLogger("marrowcount.export")

AUTO_EXPORT_DAYS = 7


class ExportError(MarrowError):
    """The export folder could not be written; what was written before stays."""


@dataclass(frozen=True)
class Exported:
    slide: str
    issue: int
    kind: str  # "report" or "withdrawn"
    paths: tuple[Path, ...]


def export_reports(store: Store, cfg: Any, since: datetime | None = None) -> list[Exported]:
    """Write every sign-off's report and every withdrawal not yet exported, made since
    ``since`` (default: the last AUTO_EXPORT_DAYS), oldest first; returns what was written.
    Does nothing without ``review.export_dir``. Raises ExportError when the folder cannot
    be written (what was exported before that stays marked)."""
    if cfg.review.export_dir is None:
        return []
    folder = cfg.resolve(cfg.review.export_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"export folder {folder}: {exc.strerror}") from None
    cutoff = since or datetime.now(timezone.utc) - timedelta(days=AUTO_EXPORT_DAYS)
    with store.session() as s:
        todo = [(r.id, r.slide_id, r.action) for r in s.scalars(
            select(Review).where(Review.exported_at.is_(None), Review.at >= cutoff,
                                 or_(Review.action == "reopen",
                                     (Review.action == "sign") & Review.report.is_not(None)))
            .order_by(Review.id))]
    done = []
    for review_id, slide_id, action in todo:
        with store.session() as s:
            slide = s.get(Slide, slide_id)
            # A reopening withdraws the issue signed last before it.
            issue = len(list(s.scalars(select(Review.id).where(
                Review.slide_id == slide_id, Review.action == "sign", Review.id < review_id))))
            if action == "sign":
                issue += 1
            name, case = slide.name, parse_case(slide.case_info).model_dump(mode="json")
            reopen = s.get(Review, review_id) if action == "reopen" else None
            notice = None if reopen is None else {
                "notice": "withdrawn", "slide": name, "case": case, "issue": issue,
                "reopened_by": reopen.username, "reopened_at": iso_time(reopen.at),
                "reason": reopen.note}
        stem = f"{file_safe(name)}-issue{issue}"
        try:
            if notice is not None:
                if issue == 0:  # reopened before any sign-off was recorded: nothing withdrawn
                    paths: tuple[Path, ...] = ()
                else:
                    paths = (_write(folder / f"{stem}-withdrawn.json",
                                    json.dumps(notice, indent=2) + "\n"),)
            else:
                paths = tuple(write_report(store, slide_id, cfg, fmt,
                                           folder / f"{stem}.{fmt}", issue)[1]
                              for fmt in cfg.review.export_formats)
        except OSError as exc:
            raise ExportError(f"export folder {folder}: {exc.strerror or exc}") from None
        with store.session() as s:
            s.execute(update(Review).where(Review.id == review_id).values(exported_at=utcnow()))
        if paths:
            done.append(Exported(name, issue, "report" if notice is None else "withdrawn",
                                 paths))
            log.info("exported %s issue %d (%s): %s", name, issue,
                     "report" if notice is None else "withdrawn",
                     ", ".join(p.name for p in paths))
    return done


def export_quietly(store: Store, cfg: Any) -> None:
    """``export_reports`` for the review app: a failure is logged, never shown to the signer
    (the signature stands; the next run sends it)."""
    try:
        export_reports(store, cfg)
    except Exception:
        log.exception("issued reports could not be exported now; they are sent at the next "
                      "sign-off, start of the review app or `marrowcount export-reports`")


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
