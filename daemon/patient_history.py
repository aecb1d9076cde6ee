"""A patient's other signed results, for the reviewer to compare with (a delta check).

A marrow is rarely looked at once: blasts after induction, the M:E ratio at follow-up. The
reviewer sees the patient's other signed slides beside the one under review, and a slide whose
patient ID is another slide's but whose patient name is not is pointed out: two patients under
one ID, or one name mistyped, is the mix-up a delta check exists to catch before sign-off.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from daemon.models import Review, Slide

SHOWN = 10
"""Other results shown at most, the newest first."""


@dataclass(frozen=True)
class OtherResult:
    """One other signed slide of the patient, with figures from the report its latest
    sign-off issued (None where that report was not kept, or the taxonomy has no such
    figure)."""

    slide_id: int
    name: str
    accession: str | None
    collected_on: str | None
    patient_name: str | None
    signed_at: datetime | None
    counted: int | None
    blast_pct: float | None
    me_ratio: float | None
    me_infinite: bool
    name_differs: bool


def other_results(s: Session, slide: Slide, shown: int = SHOWN) -> list[OtherResult]:
    """The other signed slides whose case has ``slide``'s patient ID, newest sign-off first
    (``shown`` of them); [] when ``slide`` has no patient ID. ``name_differs``: both slides
    name the patient and the names differ (case and spacing aside)."""
    case = slide.case_info or {}
    patient_id = case.get("patient_id")
    if not patient_id:
        return []
    rows = s.scalars(
        select(Slide).where(Slide.id != slide.id, Slide.status == "signed",
                            Slide.case_info["patient_id"].as_string() == patient_id)
        .order_by(Slide.signed_at.desc(), Slide.id.desc()).limit(shown)).all()
    out = []
    for other in rows:
        report = s.scalar(select(Review.report).where(
            Review.slide_id == other.id, Review.action == "sign").order_by(Review.id.desc())
            .limit(1))
        d = (report or {}).get("differential") or {}
        theirs = (other.case_info or {}).get("patient_name")
        out.append(OtherResult(
            other.id, other.name, (other.case_info or {}).get("accession"),
            (other.case_info or {}).get("collected_on"), theirs, other.signed_at,
            d.get("total"), d.get("blast_pct"), d.get("me_ratio"), bool(d.get("me_infinite")),
            _differ(case.get("patient_name"), theirs)))
    return out


def _differ(a: str | None, b: str | None) -> bool:
    return bool(a and b) and " ".join(a.casefold().split()) != " ".join(b.casefold().split())
