"""Review app settings (the ``review:`` section of config/default.yaml)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field

from daemon.case import CaseKey
from pipeline.params import Params


class ReviewParams(Params):
    host: str = Field(description="address the review app binds; 127.0.0.1 keeps it local")
    port: int = Field(ge=0, le=65535)
    laboratory: Optional[str] = Field(
        max_length=300, description="the laboratory's name and address, at the head of every "
                                    "report (none: not printed)")
    report_statement: Optional[str] = Field(
        max_length=2000, description="the intended use and limitations, printed on every "
                                     "report and kept with each issued one (the laboratory's "
                                     "own words once it has validated its method)")
    session_hours: float = Field(gt=0, description="a login lasts this long")
    idle_minutes: Optional[float] = Field(
        gt=0, description="a login unused this long ends (a shared bench PC left logged in); "
                          "the pages' own refreshing does not count as use (none: off)")
    secure_cookies: bool = Field(
        description="mark the session cookie Secure (set when served behind HTTPS)"
    )
    queue_refresh_s: float = Field(gt=0, description="queue page polling interval")
    failed_shown_days: float = Field(
        gt=0, le=3650, description="a failed slide (no result) leaves the queue this long after it "
                          "failed; a search still finds it")
    require_case: list[CaseKey] = Field(
        description="case fields a slide must have before it can be signed off "
                    "(accession, patient_id, patient_name, specimen, collected_on)")
    sign_roles: list[Literal["technician", "supervisor"]] = Field(
        min_length=1, description="roles that may sign a slide off; [supervisor] makes "
                                  "technicians review and a supervisor sign")
    require_flags_checked: bool = Field(
        description="sign-off waits until every cell the machine flagged for review has been "
                    "confirmed, moved to another class or excluded")
    export_dir: Optional[Path] = Field(
        description="folder the laboratory information system watches: each sign-off's "
                    "report and each withdrawal notice is written there (none: off)")
    export_formats: list[Literal["pdf", "json", "csv"]] = Field(
        min_length=1, description="formats of the exported reports")
    sign_password: bool = Field(
        description="sign-off, and reopening a signed slide, ask for the person's password "
                    "again (an electronic signature bound to the person, as 21 CFR Part 11 "
                    "asks); wrong ones count toward the login lockout")
