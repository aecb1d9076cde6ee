"""Retention: free the disk that whole-field images take once a slide is signed (or failed)
and old.

A kept 1388×1040 field image is about 2 MB as PNG, some 40–100 MB a slide, and it is only
needed while someone may still review the field. ``purge_field_images`` deletes the field
images of slides signed before a date, and of failed slides (no result; cancelled ones too)
that ended before it: those had kept theirs for ever. Everything else stays: every cell's crop (the gallery,
`export-reviewed`), the counts, the calls and reviews, the report. Each slide purged gets an
audit event naming who purged what. A reopened purged slide can still be reclassified from its
crops; cells can no longer be added to its fields (the review app says the image was not kept).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import and_, case, or_, select, update

from daemon.models import AuditEvent, Field, Slide
from daemon.store import Store, failed_before

log = logging.getLogger("marrowcount.retention")


@dataclass(frozen=True)
class PurgedSlide:
    """One signed or failed slide's field images, deleted (or, in a dry run, that would be);
    ``ended_at``: when it was signed, or when it failed."""

    slide: str
    status: str
    ended_at: datetime
    fields: int
    bytes: int
    missing: int  # files already gone: their rows are cleared all the same
    not_deleted: int = 0  # files that could not be deleted (permissions): left for a person


def purge_field_images(store: Store, signed_before: datetime, by: str,
                       dry_run: bool = False) -> list[PurgedSlide]:
    """Delete the field images of every slide signed before ``signed_before`` (aware UTC),
    and of every failed slide that ended before it.

    Per slide, the rows are cleared and the audit event written in one transaction first, and
    only then are the files deleted: a crash between the two leaves unreferenced files (run it
    again to no effect on them; disk only), never a row that names a deleted image. A slide
    reopened meanwhile is skipped. A file that cannot be deleted (permissions) is logged and
    counted in ``not_deleted``; the run goes on. ``dry_run`` changes nothing and says what
    would go.
    """
    signed_before = signed_before.astimezone(timezone.utc)
    ended = case((Slide.status == "signed", Slide.signed_at), else_=Slide.finished_at)
    with store.session() as s:
        ids = list(s.scalars(
            select(Slide.id).where(
                or_(and_(Slide.status == "signed", Slide.signed_at < signed_before),
                    failed_before(signed_before)),
                Slide.id.in_(select(Field.slide_id).where(Field.image_path.is_not(None))))
            .order_by(ended, Slide.id)))
    done = []
    for sid in ids:
        with store.session() as s:
            slide = s.get(Slide, sid)
            fields = list(s.execute(select(Field.id, Field.image_path).where(
                Field.slide_id == sid, Field.image_path.is_not(None))))
            if slide is None or slide.status not in ("signed", "failed") or not fields:
                continue
            name, status = slide.name, slide.status
            ended_at = slide.signed_at if status == "signed" else slide.finished_at
        paths = [store.path(rel) for _, rel in fields]
        sizes = [p.stat().st_size if p.is_file() else None for p in paths]
        found = [n for n in sizes if n is not None]
        item = PurgedSlide(name, status, ended_at, len(fields), sum(found),
                           len(sizes) - len(found))
        if dry_run:
            done.append(item)
            continue
        with store.session() as s:
            # One statement both checks that the slide is as it was (signed, or failed) and
            # clears the rows, so a reopening or a retry committed a moment earlier wins (a
            # SELECT ... FOR UPDATE locks nothing on SQLite); it holds the write lock until the
            # audit event commits.
            cleared = s.execute(
                update(Field)
                .where(Field.id.in_([fid for fid, _ in fields]),
                       select(Slide.status).where(Slide.id == sid).scalar_subquery()
                       == status)
                .values(image_path=None)
                .execution_options(synchronize_session=False)).rowcount
            if cleared != len(fields):
                s.rollback()
                continue  # reopened meanwhile: its images stay
            s.add(AuditEvent(username=by, action="purge_field_images", slide_id=sid,
                             before={"fields_with_image": item.fields, "bytes": item.bytes},
                             after={"ended_before": signed_before.isoformat(),
                                    "status": status}))
        failed = []
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
            except OSError as exc:  # no longer referenced: say so, the others go on
                failed.append(f"{p}: {exc.strerror}")
        if failed:
            log.error("%s: %d field image(s) could not be deleted (delete them by hand; no "
                      "row refers to them): %s", name, len(failed), "; ".join(failed[:3]))
        done.append(dataclasses.replace(item, not_deleted=len(failed)))
    return done
