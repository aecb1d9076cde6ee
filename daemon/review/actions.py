"""What a reviewer can do to a slide, each change written with exactly one audit event per cell.

These functions take an open SQLAlchemy session (``Store.session()``), so a change and its
audit events commit together or not at all. A signed slide refuses every change until a
supervisor reopens it. Undo reverts the reviewer's own last change (all cells of a
multi-cell move at once) and is itself audited.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from daemon.case import LABELS as CASE_LABELS, CaseError, CaseInfo, parse_case
from daemon.models import (
    EXCLUDE_REASONS,
    AuditEvent,
    Cell,
    Count,
    Field,
    Review,
    Slide,
    utcnow,
)
from daemon.store import lock_slide, write_whole
from pipeline.errors import MarrowError
from pipeline.imaging import CROP_SIZE, crop_at, read_rgb
from pipeline.taxonomy import Taxonomy

# Changes to cells that undo can revert.
CELL_ACTIONS = ("reclassify", "confirm", "exclude", "include", "add_cell")
SIGNABLE = ("awaiting_review",)
# A cell added closer than this to a kept cell's centre is that cell again (two touching
# leukocytes' centres lie 7.5 µm or more apart: pipeline.detect's separate_nucleus_um), and
# so is one inside its box up to ADD_IN_BOX_UM away (a neutrophil's outer lobe).
ADD_MIN_DISTANCE_UM = 5.0
ADD_IN_BOX_UM = 7.0


class ReviewError(MarrowError):
    """A review request that cannot be carried out; ``status`` is its HTTP status."""

    status = 400


class NotFound(ReviewError):
    status = 404


class Forbidden(ReviewError):
    status = 403


class Locked(ReviewError):
    status = 409


class Stale(ReviewError):
    """The page a request came from no longer shows the slide as it is."""

    status = 409
    title = "Changed meanwhile"


@dataclass(frozen=True)
class Reviewer:
    username: str
    role: str


def final_label(cell: Cell) -> str:
    """The class a cell counts as: the reviewer's call when there is one, else the machine's."""
    return cell.reviewed_label or cell.label


def is_counted(cell: Cell, taxonomy: Taxonomy) -> bool:
    label = final_label(cell)
    return (
        not cell.excluded
        and cell.duplicate_of is None
        and label in taxonomy.names
        and taxonomy.get(label).counted
    )


def open_flags(s: Session, slide_id: int) -> int:
    """How many of the slide's cells are flagged and not yet answered (``Cell.flag_open``)."""
    return s.scalar(select(func.count(Cell.id)).where(Cell.slide_id == slide_id,
                                                      Cell.flag_open)) or 0


def cell_state(cell: Cell) -> dict[str, Any]:
    """The reviewable part of a cell, as stored in audit events' before/after."""
    return {
        "label": final_label(cell),
        "reviewed_label": cell.reviewed_label,
        "excluded": bool(cell.excluded),
        "exclude_reason": cell.exclude_reason,
    }


def get_slide(s: Session, slide_id: int) -> Slide:
    slide = s.get(Slide, slide_id)
    if slide is None:
        raise NotFound(f"no slide {slide_id}")
    return slide


def taxonomy_of(slide: Slide, taxonomies: dict[str, Taxonomy]) -> Taxonomy:
    try:
        return taxonomies[slide.taxonomy]
    except KeyError:
        raise ReviewError(
            f"slide {slide.name!r} uses taxonomy {slide.taxonomy!r}, which this config lacks"
        ) from None


def editable_slide(s: Session, slide_id: int) -> Slide:
    """The slide, locked for this transaction, if it may still be changed."""
    slide = lock_slide(s, slide_id)
    if slide is None:
        raise NotFound(f"no slide {slide_id}")
    if slide.status == "signed":
        raise Locked(f"slide {slide.name!r} is signed; a supervisor must reopen it first")
    return slide


def _cells(s: Session, slide_id: int, cell_ids: list[int]) -> list[Cell]:
    ids = sorted({int(i) for i in cell_ids})
    if not ids:
        raise ReviewError("no cells selected")
    cells = list(s.scalars(select(Cell).where(Cell.slide_id == slide_id, Cell.id.in_(ids))))
    if len(cells) != len(ids):
        missing = sorted(set(ids) - {c.id for c in cells})
        raise NotFound(f"cells {missing} are not on slide {slide_id}")
    if any(c.duplicate_of is not None for c in cells):
        raise ReviewError("a suppressed duplicate cannot be reviewed; review the kept cell")
    return cells


def _audit(s: Session, who: Reviewer, action: str, slide_id: int, cell_id: int | None,
           before: dict[str, Any] | None, after: dict[str, Any] | None) -> None:
    s.add(AuditEvent(username=who.username, action=action, slide_id=slide_id, cell_id=cell_id,
                     before=before, after=after))


def _change_cells(s: Session, slide_id: int, cells: list[Cell], who: Reviewer, action: str,
                  apply: Any) -> list[Cell]:
    """``apply`` changes one cell; it may return the action to audit for that cell instead
    of ``action``."""
    batch = uuid.uuid4().hex[:12]
    changed = []
    for cell in cells:
        before = cell_state(cell)
        done = apply(cell) or action
        after = cell_state(cell)
        if after == before:
            continue
        _audit(s, who, done, slide_id, cell.id, before, {**after, "batch": batch})
        changed.append(cell)
    s.flush()
    return changed


def reclassify(s: Session, slide_id: int, cell_ids: list[int], label: str, who: Reviewer,
               taxonomies: dict[str, Taxonomy]) -> list[Cell]:
    """Put cells into class ``label`` (an excluded cell moved to a class counts again). A
    flagged cell put into the class it already has is confirmed: the reviewer's call is
    recorded (audited as ``confirm``), and the flag is answered."""
    slide = editable_slide(s, slide_id)
    if label not in taxonomy_of(slide, taxonomies).names:
        raise ReviewError(f"{label!r} is not a class of taxonomy {slide.taxonomy!r}")

    def apply(cell: Cell) -> str | None:
        confirm = cell.flag_open and cell.label == label
        if final_label(cell) != label or cell.excluded or confirm:
            cell.reviewed_label = label
        cell.excluded, cell.exclude_reason = False, None
        return "confirm" if confirm else None

    return _change_cells(s, slide_id, _cells(s, slide_id, cell_ids), who, "reclassify", apply)


def exclude(s: Session, slide_id: int, cell_ids: list[int], reason: str,
            who: Reviewer) -> list[Cell]:
    """Leave cells out of the count, with one of EXCLUDE_REASONS."""
    if reason not in EXCLUDE_REASONS:
        raise ReviewError(f"exclusion reason {reason!r} must be one of {sorted(EXCLUDE_REASONS)}")
    editable_slide(s, slide_id)

    def apply(cell: Cell) -> None:
        cell.excluded, cell.exclude_reason = True, reason

    return _change_cells(s, slide_id, _cells(s, slide_id, cell_ids), who, "exclude", apply)


def include(s: Session, slide_id: int, cell_ids: list[int], who: Reviewer) -> list[Cell]:
    """Count excluded cells again."""
    editable_slide(s, slide_id)

    def apply(cell: Cell) -> None:
        cell.excluded, cell.exclude_reason = False, None

    return _change_cells(s, slide_id, _cells(s, slide_id, cell_ids), who, "include", apply)


def undo(s: Session, slide_id: int, who: Reviewer) -> list[Cell]:
    """Revert ``who``'s most recent change on this slide not yet undone (a whole batch)."""
    editable_slide(s, slide_id)
    events = list(s.scalars(
        select(AuditEvent)
        .where(AuditEvent.slide_id == slide_id, AuditEvent.username == who.username,
               AuditEvent.action.in_((*CELL_ACTIONS, "undo")))
        .order_by(AuditEvent.id.desc())
    ))
    undone = {int(e.after["undoes"]) for e in events if e.action == "undo" and e.after}
    todo = [e for e in events if e.action != "undo" and e.id not in undone]
    if not todo:
        raise ReviewError("nothing to undo")
    batch = (todo[0].after or {}).get("batch")
    group = [e for e in todo if batch is not None and (e.after or {}).get("batch") == batch]
    cells = []
    for event in group or todo[:1]:
        cell = s.get(Cell, event.cell_id)
        if cell is None:
            continue
        before = cell_state(cell)
        if event.before is None:  # an added cell: undoing the addition leaves it out
            cell.excluded, cell.exclude_reason = True, "added_in_error"
        else:
            cell.reviewed_label = event.before["reviewed_label"]
            cell.excluded = event.before["excluded"]
            cell.exclude_reason = event.before["exclude_reason"]
        _audit(s, who, "undo", slide_id, cell.id, before, {**cell_state(cell), "undoes": event.id})
        cells.append(cell)
    s.flush()
    return cells


def add_cell(s: Session, slide_id: int, field_id: int, x: float, y: float, label: str,
             who: Reviewer, taxonomies: dict[str, Taxonomy], data_dir: Path,
             crop_um_per_px: float) -> Cell:
    """Add a cell the machine missed at ``(x, y)`` field pixels, with a crop cut from the field
    at the classifier's crop scale ``crop_um_per_px``.

    The machine's counts are unchanged (it never saw this cell); the reviewed counts include it.
    """
    # The field image is read and cut before the slide is locked: decoding a whole field
    # must not hold the database's write lock (on SQLite the daemon's commits wait for it).
    fld = s.get(Field, field_id)
    if fld is None or fld.slide_id != slide_id:
        raise NotFound(f"no field {field_id} on slide {slide_id}")
    if fld.image_path is None or not fld.width or not fld.height:
        raise ReviewError("this field's image was not kept, so no cell can be added to it")
    if not (0 <= x < fld.width and 0 <= y < fld.height):
        raise ReviewError(f"({x:.0f}, {y:.0f}) lies outside the {fld.width}×{fld.height} field")
    crop = crop_at(read_rgb(image_file(data_dir, fld.image_path)), fld.um_per_px, (x, y),
                   crop_um_per_px)
    slide = editable_slide(s, slide_id)  # a purge needs a signed slide: the image was there
    if label not in taxonomy_of(slide, taxonomies).names:
        raise ReviewError(f"{label!r} is not a class of taxonomy {slide.taxonomy!r}")
    near = _cell_near(s, fld, x, y)
    if near is not None:
        cell, dist_um = near
        what = ("an excluded cell lies there; include it instead" if cell.excluded else
                f"{final_label(cell).replace('_', ' ')} cell {cell.id} is counted there; "
                "reclassify it instead")
        raise ReviewError(f"not added: {what} ({dist_um:.1f} µm from the click)")
    index = (s.scalar(select(func.max(Cell.index)).where(Cell.field_id == field_id)) or 0) + 1
    index = max(index, 1000)  # hand-added cells are numbered apart from the pipeline's
    rel = Path(fld.image_path).parent / f"added{index:04d}.png"
    _write_png_atomic(data_dir / rel, crop)
    # The box marks the cell (about half the crop's side), not the whole crop window.
    half = CROP_SIZE * crop_um_per_px / 4 / fld.um_per_px
    box = [max(0, int(x - half)), max(0, int(y - half)),
           min(fld.width, int(np.ceil(x + half))), min(fld.height, int(np.ceil(y + half)))]
    cell = Cell(field_id=field_id, slide_id=slide_id, index=index, x=float(x), y=float(y),
                box=box, crop_path=str(rel), probabilities={}, first_label=label, label=label,
                confidence=0.0, guided=False, duplicate_of=None, needs_review=False,
                reviewed_label=label, excluded=False, added_by=who.username)
    s.add(cell)
    s.flush()
    _audit(s, who, "add_cell", slide_id, cell.id, None,
           {**cell_state(cell), "field_id": field_id, "x": float(x), "y": float(y),
            "batch": uuid.uuid4().hex[:12]})
    return cell


def _cell_near(s: Session, fld: Field, x: float, y: float) -> tuple[Cell, float] | None:
    """The field's nearest kept cell that (x, y) falls on (``ADD_MIN_DISTANCE_UM``, or inside
    its box within ``ADD_IN_BOX_UM``), and the distance in µm; None when clear of every cell."""
    best = None
    for cell in s.scalars(select(Cell).where(Cell.field_id == fld.id,
                                             Cell.duplicate_of.is_(None))):
        d = float(np.hypot(cell.x - x, cell.y - y)) * fld.um_per_px
        x0, y0, x1, y1 = cell.box
        on = d < ADD_MIN_DISTANCE_UM or (d < ADD_IN_BOX_UM and x0 <= x <= x1 and y0 <= y <= y1)
        if on and (best is None or d < best[1]):
            best = (cell, d)
    return best


def machine_counts(s: Session, slide_id: int) -> dict[str, int]:
    """The pipeline's running counts (duplicates left out, non-leukocytes in)."""
    rows = s.execute(select(Count.class_name, Count.n).where(Count.slide_id == slide_id)).all()
    return {name: int(n) for name, n in rows if n}


def reviewed_counts(s: Session, slide_id: int) -> dict[str, int]:
    """Counts after review: the reviewer's class wins; excluded cells and duplicates drop out."""
    final = func.coalesce(Cell.reviewed_label, Cell.label)
    rows = s.execute(
        select(final, func.count())
        .where(Cell.slide_id == slide_id, Cell.duplicate_of.is_(None), Cell.excluded.is_(False))
        .group_by(final)
    ).all()
    return {name: int(n) for name, n in rows}


def set_case(s: Session, slide_id: int, values: dict[str, Any], who: Reviewer,
             was: dict[str, Any] | None = None) -> CaseInfo:
    """Set the slide's case fields (a blank one is cleared); audited. A signed slide's case
    is locked with it. ``was``: the values the form showed; then only the fields changed on
    it are saved, and one changed meanwhile by someone else refuses the save (a form left
    open must not wipe an accession entered since)."""
    slide = editable_slide(s, slide_id)
    try:
        case = parse_case(values)
        shown = None if was is None else parse_case(was)
    except CaseError as exc:
        raise ReviewError(str(exc)) from None
    if shown is not None:
        current, merged, clash = parse_case(slide.case_info), {}, []
        for key in CaseInfo.model_fields:
            new, old, now = getattr(case, key), getattr(shown, key), getattr(current, key)
            if new == old:
                merged[key] = now  # not edited on this form: what is stored stays
            elif now != old:
                clash.append(CASE_LABELS[key])
            else:
                merged[key] = new
        if clash:
            raise Stale(f"not saved: {', '.join(clash)} changed meanwhile; reload the slide "
                        "to see the case as it is, then edit it again")
        case = CaseInfo(**merged)
    before, after = slide.case_info or {}, case.stored() or {}
    if before != after:
        _audit(s, who, "edit_case", slide_id, None, before, after)
        slide.case_info = after or None
        s.flush()
    return case


def last_event(s: Session, slide_id: int) -> int:
    """The id of the slide's latest audit event (0 for none): what a page has seen."""
    return s.scalar(select(func.max(AuditEvent.id)).where(AuditEvent.slide_id == slide_id)) or 0


NOT_CHANGES = ("password_refused",)
"""Audit events on a slide that change nothing on it: no page has to be reloaded for them."""


def changes_since(s: Session, slide_id: int, seen: int, upto: int | None = None
                  ) -> dict[str, int]:
    """Changes (audit events but ``NOT_CHANGES``) on the slide after ``seen`` (up to
    ``upto``), per user."""
    q = select(AuditEvent.username, func.count()).where(
        AuditEvent.slide_id == slide_id, AuditEvent.id > seen,
        AuditEvent.action.not_in(NOT_CHANGES))
    if upto is not None:
        q = q.where(AuditEvent.id <= upto)
    return {u: int(n) for u, n in s.execute(q.group_by(AuditEvent.username)).all()}


def _check_complete(s: Session, slide: Slide, who: Reviewer, verb: str, note: str | None,
                    required_case: Sequence[str], seen: int | None,
                    taxonomies: dict[str, Taxonomy] | None,
                    require_flags_checked: bool, all_cells_seen: bool | None) -> None:
    """What a slide's review must have done before it is signed or handed on for sign-off
    (``sign``, ``pre_review``): raises the first thing missing. ``all_cells_seen``: the
    person says every counted cell was looked at, which a taxonomy whose blasts only a
    reviewer names needs (with ``taxonomies``); checking the flagged cells alone had signed
    "blasts 0.0% (0.0–0.8%)" over 455 cells nobody looked at for blasts."""
    slide_id = slide.id
    if slide.status not in SIGNABLE:
        raise Locked(f"slide {slide.name!r} is {slide.status.replace('_', ' ')}; "
                     f"only a slide awaiting review can be {verb}")
    tax = taxonomy_of(slide, taxonomies) if taxonomies is not None else None
    any_counted = tax is not None and any(
        n for k, n in reviewed_counts(s, slide_id).items() if k in tax.counted)
    if tax is not None and not any_counted and not (note or "").strip():
        raise ReviewError(f"no leukocyte is counted on slide {slide.name!r}; say in the "
                          f"note why it is {verb} (e.g. specimen inadequate)")
    if seen is not None and (since := changes_since(s, slide_id, seen)):
        # Anyone's, the signer's own too: made in another window, this page never showed it.
        raise Stale(f"not {verb}: " + ", ".join(
            (f"you made {n} change{'s' * (n != 1)} in another window" if u == who.username
             else f"{u} made {n} change{'s' * (n != 1)}") for u, n in sorted(since.items()))
            + " since this page was loaded; reload it and check first")
    # In the order the page checks them.
    missing = parse_case(slide.case_info).missing(list(required_case))
    if missing:
        raise ReviewError(f"fill in {', '.join(missing)} under Case first: slide "
                          f"{slide.name!r} is not {verb}")
    if require_flags_checked and (n := open_flags(s, slide_id)):
        raise ReviewError(
            f"{n} cell{' flagged for review is' if n == 1 else 's flagged for review are'} "
            "not checked yet: confirm each with its own class key, move it to its class or "
            "exclude it first (the ? key goes to the next one)")
    if tax is not None and any_counted and tax.blasts_by_review and not all_cells_seen:
        raise ReviewError(f"the model does not recognise blasts: tick that you looked at every "
                          f"counted cell for them, or slide {slide.name!r} is not {verb}")


def pre_review(s: Session, slide_id: int, who: Reviewer, note: str | None = None,
               required_case: Sequence[str] = (), seen: int | None = None,
               taxonomies: dict[str, Taxonomy] | None = None,
               require_flags_checked: bool = False,
               roles: Sequence[str] = ("technician", "supervisor"),
               all_cells_seen: bool | None = None) -> Review:
    """A reviewer who does not sign (``review.sign_roles`` [supervisor]) hands the slide on
    as reviewed, after the checks a sign-off makes: the slide stays open (the signer may
    still change it), the queue shows it ready for sign-off, and the report's history names
    who pre-reviewed it. One who may sign (``roles``) signs instead: "pre-reviewed by super,
    signed by super" read as two people's review."""
    if who.role in roles:
        raise Forbidden(f"a {who.role} signs slides here (review.sign_roles): a pre-review "
                        "hands a slide on to a signer, and would read as a second person")
    slide = editable_slide(s, slide_id)
    _check_complete(s, slide, who, "handed on", note, required_case, seen, taxonomies,
                    require_flags_checked, all_cells_seen)
    counts = reviewed_counts(s, slide_id)
    review = Review(slide_id=slide_id, username=who.username, action="pre_review",
                    counts_before=machine_counts(s, slide_id), counts_after=counts,
                    note=note or None)
    s.add(review)
    _audit(s, who, "pre_review", slide_id, None, None, {"counts_after": counts,
                                                       "note": note or None,
                                                       "role": who.role,
                                                       "all_cells_seen": all_cells_seen})
    s.flush()
    return review


def sign(s: Session, slide_id: int, who: Reviewer, note: str | None = None,
         required_case: Sequence[str] = (), seen: int | None = None,
         taxonomies: dict[str, Taxonomy] | None = None,
         roles: Sequence[str] = ("technician", "supervisor"),
         require_flags_checked: bool = False, all_cells_seen: bool | None = None) -> Review:
    """Sign the slide off: it is locked, and the counts before and after review are kept.
    ``required_case``: case fields that must be filled in first (``review.require_case``).
    ``seen``: the last audit event the signer's page showed; a change by someone else since
    then refuses the signature (nobody signs counts they have not seen). With
    ``taxonomies``, a slide with no counted leukocyte is signed only with a note saying why.
    ``roles``: who may sign (``review.sign_roles``). ``require_flags_checked``: every cell the
    machine flagged for review must be confirmed, moved or excluded first
    (``review.require_flags_checked``). ``all_cells_seen``: the signer says every counted
    cell was looked at (needed, with ``taxonomies``, where only a reviewer names blasts)."""
    if who.role not in roles:
        raise Forbidden(f"a {who.role} may not sign slides off here; a "
                        f"{' or '.join(roles)} signs (review.sign_roles)")
    slide = editable_slide(s, slide_id)
    _check_complete(s, slide, who, "signed", note, required_case, seen, taxonomies,
                    require_flags_checked, all_cells_seen)
    now = utcnow()
    before, after = machine_counts(s, slide_id), reviewed_counts(s, slide_id)
    review = Review(slide_id=slide_id, username=who.username, action="sign", at=now,
                    counts_before=before, counts_after=after, note=note or None)
    s.add(review)
    _audit(s, who, "sign", slide_id, None, {"status": slide.status},
           {"status": "signed", "counts_before": before, "counts_after": after,
            "note": note or None, "role": who.role,  # the role signed under, kept
            "all_cells_seen": all_cells_seen})
    slide.status, slide.signed_at, slide.signed_by = "signed", now, who.username
    s.flush()
    return review


def reopen(s: Session, slide_id: int, who: Reviewer, reason: str,
           report_not_kept: str | None = None) -> Review:
    """A supervisor reopens a signed slide for review; the reason is kept.
    ``report_not_kept``: why the signed report could not be kept first (audited; its
    counts stay in the review history)."""
    if who.role != "supervisor":
        raise Forbidden("only a supervisor can reopen a signed slide")
    reason = reason.strip()
    if not reason:
        raise ReviewError("say why the slide is reopened")
    slide = lock_slide(s, slide_id)
    if slide is None:
        raise NotFound(f"no slide {slide_id}")
    if slide.status != "signed":
        raise ReviewError(f"slide {slide.name!r} is not signed")
    counts = reviewed_counts(s, slide_id)
    review = Review(slide_id=slide_id, username=who.username, action="reopen",
                    counts_before=counts, counts_after=counts, note=reason)
    s.add(review)
    _audit(s, who, "reopen", slide_id, None,
           {"status": "signed", "signed_by": slide.signed_by,
            "signed_at": slide.signed_at.isoformat() if slide.signed_at else None},
           {"status": "awaiting_review", "reason": reason,
            **({"report_not_kept": report_not_kept} if report_not_kept else {})})
    s.execute(update(Slide).where(Slide.id == slide_id)
              .values(status="awaiting_review", signed_at=None, signed_by=None))
    s.flush()
    return review


def image_file(data_dir: Path, rel: str | None) -> Path:
    """The file a stored relative image path names, only if it lies inside ``data_dir``."""
    if not rel:
        raise NotFound("no image stored")
    root = Path(data_dir).resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise NotFound("image not found")
    return path


def _write_png_atomic(path: Path, rgb: np.ndarray) -> None:
    ok, data = cv2.imencode(".png", np.ascontiguousarray(rgb[:, :, ::-1]))
    if not ok:
        raise ReviewError("could not encode the crop")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_whole(path, lambda tmp: tmp.write_bytes(data.tobytes()))
