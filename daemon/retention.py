"""Retention: free the disk that whole-field images take once a slide is signed and old.

A kept 1388×1040 field image is about 2 MB as PNG, some 40–100 MB a slide, and it is only
needed while someone may still review the field. ``purge_field_images`` deletes the field
images of slides signed before a date. Everything else stays: every cell's crop (the gallery,
`export-reviewed`), the counts, the calls and reviews, the report. Each slide purged gets an
audit event naming who purged what. A reopened purged slide can still be reclassified from its
crops; cells can no longer be added to its fields (the review app says the image was not kept).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime, timezone

from sqlalchemy import select

from daemon.models import AuditEvent, Field, Slide
from daemon.store import Store


@dataclass(frozen=True)
class PurgedSlide:
    """One signed slide's field images, deleted (or, in a dry run, that would be)."""

    slide: str
    signed_at: datetime
    fields: int
    bytes: int
    missing: int  # files already gone: their rows are cleared all the same


def purge_field_images(store: Store, signed_before: datetime, by: str,
                       dry_run: bool = False) -> list[PurgedSlide]:
    """Delete the field images of every slide signed before ``signed_before`` (aware UTC).

    Per slide, the rows are cleared and the audit event written in one transaction first, and
    only then are the files deleted: a crash between the two leaves unreferenced files (run it
    again to no effect on them; disk only), never a row that names a deleted image. A slide
    reopened meanwhile is skipped. ``dry_run`` changes nothing and says what would go.
    """
    signed_before = signed_before.astimezone(timezone.utc)
    with store.session() as s:
        ids = list(s.scalars(
            select(Slide.id).where(Slide.status == "signed", Slide.signed_at < signed_before,
                                   Slide.id.in_(select(Field.slide_id)
                                                .where(Field.image_path.is_not(None))))
            .order_by(Slide.signed_at, Slide.id)))
    done = []
    for sid in ids:
        with store.session() as s:
            slide = s.scalar(select(Slide).where(Slide.id == sid).with_for_update())
            if slide is None or slide.status != "signed":
                continue
            fields = list(s.scalars(select(Field).where(Field.slide_id == sid,
                                                        Field.image_path.is_not(None))))
            paths = [store.path(f.image_path) for f in fields]
            sizes = [p.stat().st_size if p.is_file() else None for p in paths]
            found = [n for n in sizes if n is not None]
            item = PurgedSlide(slide.name, slide.signed_at, len(fields), sum(found),
                               len(sizes) - len(found))
            if dry_run:
                s.rollback()
                done.append(item)
                continue
            for f in fields:
                f.image_path = None
            s.add(AuditEvent(username=by, action="purge_field_images", slide_id=sid,
                             before={"fields_with_image": item.fields, "bytes": item.bytes},
                             after={"signed_before": signed_before.isoformat()}))
        for p in paths:
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        done.append(item)
    return done
