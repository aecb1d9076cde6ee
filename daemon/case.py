"""The case a slide belongs to: who the patient is and what specimen the slide was made from.

A report that names no patient or specimen is not a lab report. Instruments usually know only
a slide's barcode, so every field is optional when a slide is queued (``submit``, a scanner
file) and a technician completes them on the review page; ``review.require_case`` lists the
ones sign-off insists on. They are kept as one validated JSON object per slide.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any, Literal, Optional

from pydantic import Field, ValidationError, field_validator

from pipeline.errors import MarrowError
from pipeline.params import Params

CaseKey = Literal["accession", "patient_id", "patient_name", "specimen", "collected_on"]
LABELS: dict[str, str] = {
    "accession": "Accession",
    "patient_id": "Patient ID",
    "patient_name": "Patient name",
    "specimen": "Specimen",
    "collected_on": "Collected",
}


class CaseError(MarrowError):
    """Case fields that do not validate; the message names each field."""


class CaseInfo(Params):
    """A slide's case. Blank text is no value; text is stripped."""

    accession: Optional[str] = Field(None, max_length=64,
                                     description="the laboratory's accession or request number")
    patient_id: Optional[str] = Field(None, max_length=64, description="hospital or MRN number")
    patient_name: Optional[str] = Field(None, max_length=200)
    specimen: Optional[str] = Field(
        None, max_length=200, description="e.g. bone marrow aspirate, left posterior iliac crest")
    collected_on: Optional[date] = None

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_none(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = " ".join(v.split())
            return v or None
        return v

    @field_validator("collected_on", mode="before")
    @classmethod
    def _iso_date(cls, v: Any) -> Any:
        # 02/12/2026 is 2 December in one lab and February 12 in another: only ISO is taken.
        if isinstance(v, str) and v:
            try:
                date.fromisoformat(v)
            except ValueError:
                raise ValueError(f"{v!r} is not a date as YYYY-MM-DD (e.g. 2026-12-02)") from None
        return v

    @field_validator("collected_on")
    @classmethod
    def _not_in_the_future(cls, v: Optional[date]) -> Optional[date]:
        # A day of slack: the bench's date may be ahead of UTC.
        if v is not None and v > datetime.now(timezone.utc).date() + timedelta(days=1):
            raise ValueError(f"{v.isoformat()} is in the future")
        return v

    def missing(self, required: list[str] | tuple[str, ...]) -> list[str]:
        """Labels of the ``required`` fields that have no value."""
        return [LABELS[k] for k in required if getattr(self, k) is None]

    def stored(self) -> dict[str, Any] | None:
        """The JSON kept on the slide (set fields only), or None when nothing is set."""
        out = self.model_dump(mode="json", exclude_none=True)
        return out or None


def parse_case(values: dict[str, Any] | None) -> CaseInfo:
    """A CaseInfo from stored or entered values; CaseError names every field that is wrong."""
    try:
        return CaseInfo.model_validate(values or {})
    except ValidationError as exc:
        raise CaseError("; ".join(
            f"{LABELS.get(str(e['loc'][0]), e['loc'][0]) if e['loc'] else 'case'}: {e['msg']}"
            for e in exc.errors())) from None
