"""A slide's lab report: the differential with exact 95% intervals, M:E ratio, blast %, each
against the laboratory's reference interval, flags, who reviewed it and when, and the counts
before and after review. JSON, CSV or PDF.

``build_report`` gathers everything into one plain dict (the JSON report); the CSV and PDF
writers only lay that dict out, so the three never disagree. A sign-off issues the report: it
is kept as signed (``freeze_report``), and ``issued_report`` prints that copy again, whatever
the config (lineages, reference intervals, thresholds) has become since. Signing a reopened
slide again issues an amended report that names the one it replaces; every issue stays
printable.
"""

from __future__ import annotations

import csv
import io
import json
import math
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from daemon.case import LABELS as CASE_LABELS, parse_case
from daemon.models import EXCLUDE_REASONS, AuditEvent, Cell, Field, Review
from daemon.provenance import method_text
from daemon.store import Store, StoreError, lock_slide, write_whole
from pipeline.errors import ConfigError
from pipeline.stats import (
    Differential,
    blast_thresholds_decided,
    confidence_text,
    differential,
    interval_text,
    round_out,
    value_text,
)

FORMATS = ("json", "csv", "pdf")
#: How the CSV marks a class only a reviewer names (the PDF and the page: †).
REVIEWER_ONLY = "(named by a reviewer only)"
# A review step as the report and the slide page name it.
HISTORY_VERBS = {"sign": "signed", "reopen": "reopened", "pre_review": "pre-reviewed",
                 "cancel": "cancelled"}


def iso_time(dt: datetime | None) -> str | None:
    """A stored time as ISO 8601 in UTC, to the second."""
    if dt is None:
        return None
    if dt.tzinfo is None:  # SQLite hands back naive datetimes; they were stored in UTC
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.isoformat(timespec="seconds")


def when_text(when: datetime | str | None) -> str:
    """A time as people read it on reports and pages: 2026-12-02 11:19 UTC. Takes a stored
    datetime (naive ones are UTC, as SQLite hands them back) or its ISO text."""
    if not when:
        return "–"
    if isinstance(when, str):
        try:
            when = datetime.fromisoformat(when)
        except ValueError:
            return when
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")  # events a minute apart stay in order


def _diff_dict(d: Differential) -> dict[str, Any]:
    """A differential as plain data, unrounded: the PDF, the review page and the console round
    the exact value once for display (rounding an already rounded 3.7475 gives 3.8, not 3.7);
    JSON and CSV round at output (``_rounded``)."""
    return {
        "total": d.total,
        "confidence": d.confidence,
        "classes": [
            {"name": r.name, "label": r.label, "lineage": r.lineage, "blast": r.blast, "n": r.n,
             "pct": r.pct, "ci_low_pct": r.ci_low_pct, "ci_high_pct": r.ci_high_pct,
             "reference_pct": None if r.reference is None else list(r.reference),
             "outside": r.outside, "reviewer_only": r.reviewer_only}
            for r in d.rows
        ],
        "myeloid": d.myeloid,
        "erythroid": d.erythroid,
        "myeloid_classes": list(d.myeloid_classes),
        "erythroid_classes": list(d.erythroid_classes),
        "me_ratio": d.me_ratio,
        "me_infinite": d.me_infinite,
        # JSON has no infinity: an upper bound of infinity (no erythroid cell) is null.
        "me_ci": None if d.me_ci is None else [None if math.isinf(x) else x for x in d.me_ci],
        "me_reference": None if d.me_reference is None else list(d.me_reference),
        "me_outside": d.me_outside,
        "blast_n": d.blast_n,
        "blast_pct": d.blast_pct,
        "blast_ci_pct": None if d.blast_ci_pct is None else list(d.blast_ci_pct),
        "blast_reviewer_only": d.blast_reviewer_only,
        "not_reported": list(d.not_reported),
        "not_counted": d.not_counted,
        "threshold_flags": [f.message for f in d.flags],
    }


# Decimals of each differential value in JSON and CSV: % to 0.01, the M:E ratio to 0.001
# (the precision the L / H marks are judged at, pipeline.stats).
_DECIMALS = {"pct": 2, "ci_low_pct": 2, "ci_high_pct": 2, "blast_pct": 2, "blast_ci_pct": 2,
             "me_ratio": 3, "me_ci": 3}
# Interval bounds round outward (pipeline.stats.round_out): a [low, high] list, or a key.
_LOWER, _UPPER = {"ci_low_pct"}, {"ci_high_pct"}


def _rounded(rep: dict[str, Any]) -> dict[str, Any]:
    """``rep`` with its differentials' values rounded for JSON and CSV."""
    def one(k: str, x: float | None, i: int | None = None) -> float | None:
        if x is None:
            return None
        if k in _LOWER or i == 0:
            return round_out(x, _DECIMALS[k], False)
        if k in _UPPER or i == 1:
            return round_out(x, _DECIMALS[k], True)
        return round(x, _DECIMALS[k])

    def rnd(d: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            if k == "classes":
                v = [rnd(c) for c in v]
            elif k in _DECIMALS and v is not None:
                v = ([one(k, x, i) for i, x in enumerate(v)] if isinstance(v, list)
                     else one(k, v))
            out[k] = v
        return out

    return {**rep, "differential": rnd(rep["differential"]),
            "machine_differential": rnd(rep["machine_differential"])}


def report_json(rep: dict[str, Any]) -> str:
    """The report as JSON text, values rounded as the CSV has them."""
    return json.dumps(_rounded(rep), indent=2) + "\n"


def me_definition(myeloid: Sequence[str] | None, erythroid: Sequence[str], classes: Sequence[str],
                  labels: dict[str, str]) -> str:
    """What each side of the M:E ratio counts, by class label ("myeloid (Promyelocyte, …) :
    erythroid (Erythroblast); Monocyte, Lymphocyte in neither"); ``myeloid`` None (a report
    kept before the sides were recorded) says only "myeloid : erythroid"."""
    if myeloid is None:
        return "myeloid : erythroid"
    neither = [c for c in classes if c not in {*myeloid, *erythroid}]

    def names(xs: Sequence[str]) -> str:
        return ", ".join(labels.get(x, x) for x in xs) or "none"

    return (f"myeloid ({names(myeloid)}) : erythroid ({names(erythroid)})"
            + (f"; {names(neither)} in neither" if neither else ""))


def _me_definition(rep: dict[str, Any]) -> str:
    d = rep["differential"]
    return me_definition(d.get("myeloid_classes"), d.get("erythroid_classes", ()),
                         [c["name"] for c in d["classes"]] + list(d.get("not_reported", ())),
                         rep.get("class_labels") or {})


def slides_in_review(s: Session, slide_ids: Sequence[int]) -> set[int]:
    """The slides whose counts are a review's, not the machine's alone: a reviewer changed,
    confirmed, excluded or added a cell, or the slide was signed once (and reopened since,
    even with the counts unchanged). The report's basis, the page's and the queue's."""
    if not slide_ids:
        return set()
    touched = s.scalars(select(Cell.slide_id).where(
        Cell.slide_id.in_(slide_ids), Cell.duplicate_of.is_(None),
        or_(Cell.reviewed_label.is_not(None), Cell.excluded.is_(True),
            Cell.added_by.is_not(None))).distinct())
    reviewed = s.scalars(select(Review.slide_id).where(Review.slide_id.in_(slide_ids))
                         .distinct())
    return set(touched) | set(reviewed)


def reference_text(interval: Sequence[float] | None) -> str:
    """A reference interval as the laboratory wrote it ("0 – 2.75"); "" when it set none."""
    return "" if interval is None else f"{interval[0]:g} – {interval[1]:g}"


def prescan_text(pre: dict[str, Any]) -> str:
    """One line on a pre-scan summary (``FieldPlan.prescan`` or a report's ``prescan``)."""
    why = "".join(f", {n} {r}" for r, n in pre["left_out_by_reason"].items())
    return f"pre-scan at {pre['objective']} kept {pre['kept']} of {pre['planned']} fields{why}"


def slide_methods(s: Session, slide_id: int) -> list[dict[str, Any]]:
    """Each distinct method (``daemon.provenance``) that analysed a slide's fields, with how
    many fields it analysed, in order of first use; fields from before methods were recorded
    count as one method without parts."""
    seen: dict[str, dict[str, Any]] = {}
    for m in s.scalars(select(Field.method).where(Field.slide_id == slide_id,
                                                   Field.skipped_reason.is_(None))
                       .order_by(Field.index)):
        m = m or {}
        key = json.dumps(m, sort_keys=True)
        seen.setdefault(key, {**m, "fields": 0})["fields"] += 1
    return list(seen.values())


def pixel_size_checks(store: Store, slide_ids: Sequence[int], cfg: Any
                      ) -> dict[int, dict[str, Any] | None]:
    """Each slide's stated pixel size against its measured fields' red cells (the daemon
    measures the first ``calibrate.check_fields``); None for a slide with no field measured.
    ``off_pct``: how far the stated size is from the estimate, in percent."""
    from pipeline.calibrate import check_stated_scale

    out: dict[int, dict[str, Any] | None] = {}
    for sid, (pooled, fields, stated) in store.red_cells(slide_ids).items():
        if not fields or stated is None:
            out[sid] = None
            continue
        est, off = check_stated_scale(pooled, stated, cfg.calibrate)
        um = None if est.um_per_px is None else round(est.um_per_px, 4)
        out[sid] = {"stated_um_per_px": stated, "estimate_um_per_px": um,
                    "off_pct": None if um is None else 100 * (stated / um - 1),
                    "red_cells": est.n_cells, "fields": fields, "disagrees": off}
    return out


def build_report(store: Store, slide_ref: int | str, cfg: Any) -> dict[str, Any]:
    """Everything a lab report says about one slide, as plain JSON-ready data.

    The final differential is the reviewed one once the slide is signed, else the machine's.
    Raises StoreError for an unknown slide, ConfigError for a slide whose taxonomy the
    config lacks.
    """
    slide = store.slide(slide_ref)
    if slide.taxonomy not in cfg.taxonomies:
        # Reading its cells under another taxonomy would drop every class it lacks silently.
        raise ConfigError(f"slide {slide.name!r} was counted under taxonomy {slide.taxonomy!r}, "
                          f"which this config lacks (it has {sorted(cfg.taxonomies)}): add it "
                          "under `taxonomies` to report the slide")
    taxonomy = cfg.model_copy(update={"taxonomy": slide.taxonomy}).classes
    machine = store.counts(slide.id)
    machine_diff = differential(machine, taxonomy, cfg.stats, machine=True)
    with store.session() as s:
        n_fields, n_skipped, field_um = s.execute(
            select(func.count(Field.id),
                   func.count(Field.skipped_reason), func.max(Field.um_per_px))
            .where(Field.slide_id == slide.id)).one()
        flagged, flags_open = s.execute(select(
            func.count(Cell.id).filter(Cell.needs_review.is_(True)),
            func.count(Cell.id).filter(Cell.flag_open),
        ).where(Cell.slide_id == slide.id, Cell.duplicate_of.is_(None))).one()
        in_review = slide.id in slides_in_review(s, [slide.id])
        # Cells review left out of the count (an added cell undone was never in it).
        excluded = dict(s.execute(
            select(Cell.exclude_reason, func.count(Cell.id))
            .where(Cell.slide_id == slide.id, Cell.duplicate_of.is_(None),
                   Cell.excluded.is_(True), Cell.added_by.is_(None))
            .group_by(Cell.exclude_reason)).all())
        # Each way apart: 20 left out and 5 added is not "15 left out".
        was_in = Cell.added_by.is_(None) & Cell.label.in_(taxonomy.counted)
        is_in = (Cell.excluded.is_(False)
                 & func.coalesce(Cell.reviewed_label, Cell.label).in_(taxonomy.counted))
        left_out, added = s.execute(select(
            func.count(Cell.id).filter(was_in & ~is_in),
            func.count(Cell.id).filter(~was_in & is_in),
        ).where(Cell.slide_id == slide.id, Cell.duplicate_of.is_(None))).one()
        reviews = list(s.scalars(select(Review).where(Review.slide_id == slide.id)
                                 .order_by(Review.at, Review.id)))
        methods = slide_methods(s, slide.id)
        signed = slide.status == "signed"
        # Whether the signer said every counted cell was looked at (blasts named by review).
        attested = signed and bool(_last_sign_event(s, slide.id).get("all_cells_seen"))
    # The counts as they stand: the machine's until a reviewer changes a cell, then the
    # reviewed ones, signed or not (a report printed mid-review shows what the page shows).
    final_counts = store.reviewed_counts(slide.id)
    basis = "reviewed" if signed else "review in progress" if in_review else "machine"
    final = differential(final_counts, taxonomy, cfg.stats, machine=basis == "machine")

    flags = [f.message for f in final.flags]
    counted = machine_diff.total
    # An adaptive stop rests on the machine's blast calls; a review that leaves a threshold
    # undecided (at the stop's own stricter interval, and its minimum count) takes away its
    # reason, and the short count is a short count again.
    stopped_early = (slide.stopped_because == "adaptive_stop"
                     and blast_thresholds_decided(final, cfg.stats) is not None)
    reviewed = (f"review left {left_out} of the machine's {counted} out"
                + (f" and added {added}" if added else "") if left_out else
                f"review added {added}" if added else "")
    if (slide.status not in ("queued", "acquiring") and final.total < slide.target
            and not stopped_early):
        why = []
        if slide.stopped_because == "area_exhausted":
            why.append("the counting area was used up")
        if slide.stopped_because == "adaptive_stop":
            why.append(f"counting stopped at {counted} because the machine's count decided "
                       "every blast threshold; the reviewed count does not")
        if left_out:
            why.append(reviewed)
        flags.append(f"target not reached: {final.total} of {slide.target} cells counted"
                     + (f" ({'; '.join(why)})" if why else "")
                     + ": every interval is wider than the target count would give")
    if (slide.status not in ("queued", "acquiring")
            and 0 < final.total < cfg.stats.min_reportable_cells):
        flags.append(f"only {final.total} cells counted: fewer than the laboratory's minimum "
                     f"of {cfg.stats.min_reportable_cells} for a differential "
                     "(stats.min_reportable_cells)")
    if stopped_early:
        flags.append(f"stopped early at {counted} of {slide.target} cells: every blast "
                     "threshold was already decided"
                     + (f" ({reviewed}; the {final.total} counted still decide them)"
                        if reviewed else ""))
    if slide.status == "failed":
        flags.append(slide.error if (slide.error or "").startswith("cancelled by ")
                     else f"acquisition failed: {slide.error}")
    if slide.status in ("queued", "acquiring"):
        flags.append(f"preliminary: slide is still {slide.status}")
    elif slide.status == "awaiting_review":
        flags.append("preliminary: review in progress, not signed" if in_review
                     else "preliminary: not yet reviewed and signed")
    if len(methods) > 1:
        flags.append(f"counted with {len(methods)} methods (the model or its settings changed "
                     "during the count): " + "; ".join(
                         f"{m['fields']} fields by {method_text(m)}" for m in methods))
    pixel = pixel_size_checks(store, [slide.id], cfg)[slide.id]
    if pixel and pixel["disagrees"]:
        flags.append(f"pixel size check: red cells measure {pixel['estimate_um_per_px']:.3g} "
                     f"µm/px against the stated {pixel['stated_um_per_px']:.3g} "
                     f"({pixel['off_pct']:+.0f}%): every size in µm and the classifier's "
                     "crops are off; check the scanner's or objective's calibration")
    if final.total == 0 and slide.status not in ("queued", "acquiring"):
        flags.append("no leukocyte counted: no differential, M:E ratio or blast % can be "
                     "reported" + (f" (all {n_fields} fields were skipped)"
                                   if n_fields and n_skipped == n_fields else ""))
    if not any(c.blast for c in taxonomy.classes):
        flags.append(f"taxonomy {taxonomy.name!r} has no blast class: blast % not reported, "
                     "and blasts present were counted under other classes")
    elif final.blast_reviewer_only and final.blast_pct is None and final.total:
        flags.append("the model does not recognise blasts: blast % is not reported until a "
                     "reviewer has named them, and this count cannot exclude a blast excess")
    elif final.blast_reviewer_only:
        flags.append("blasts are counted only where a reviewer named them (the model does not "
                     "recognise blasts): the blast % rests on the review"
                     + (", which is not finished: it may still rise" if not signed else
                        "; the signer confirmed every counted cell was looked at for them"
                        if attested else
                        "; the sign-off does not record that every counted cell was looked "
                        "at for them"))
    unknown_to_model = [c.label for c in taxonomy.classes
                        if c.reviewer_only and c.counted and not c.blast]
    if unknown_to_model and final.total:
        # A 0% plasma-cell row (myeloma starts at 10%) is only what the review named.
        flags.append(f"the model does not recognise {', '.join(unknown_to_model)}: such cells "
                     "count only where a reviewer named them, and are otherwise counted "
                     "under the model's classes")
    if final.total and final.myeloid and not final.erythroid:
        flags.append(f"no erythroid cell counted: the M:E ratio is infinite "
                     f"({final.myeloid} : 0)")

    review = None
    if reviews or in_review:
        # The last signature, even when the slide has been reopened since (then "signed" is
        # false and the history says who reopened it and why).
        last_sign = next((r for r in reversed(reviews) if r.action == "sign"), None)
        review = {
            "signed": signed,
            "reviewer": last_sign.username if last_sign else None,
            "signed_at": iso_time(last_sign.at) if last_sign else None,
            "counts_before": {k: n for k, n in machine.items() if n},
            "counts_after": final_counts,
            # What review did with the cells the machine flagged, and what it left out.
            "flags_checked": int(flagged - flags_open),
            "excluded": {str(k): int(n) for k, n in sorted(excluded.items(), key=str)},
            "history": [{"username": r.username, "action": r.action, "at": iso_time(r.at),
                         "note": r.note} for r in reviews],
        }
    pre = (slide.plan or {}).get("prescan")
    prescan = None if not pre else {k: pre[k] for k in (
        "objective", "um_per_px", "planned", "kept", "left_out_by_reason")}
    return {
        "report_version": 8,
        "generated_at": iso_time(datetime.now(timezone.utc)),
        "slide": {
            "id": slide.id, "name": slide.name, "source": slide.source,
            "source_ref": slide.source_ref, "status": slide.status, "target": slide.target,
            "case": parse_case(slide.case_info).model_dump(mode="json"),
            # The pixel size counted at: stated on the slide, else the fields' (microscope,
            # file metadata); every report states it, checked against red cells or not.
            "taxonomy": taxonomy.name, "um_per_px": slide.um_per_px or field_um,
            "stopped_because": slide.stopped_because, "error": slide.error,
            "created_at": iso_time(slide.created_at), "started_at": iso_time(slide.started_at),
            "finished_at": iso_time(slide.finished_at), "instrument": slide.worker,
            "fields": int(n_fields), "fields_skipped": int(n_skipped),
            "cells_flagged": int(flagged),
            "cells_needing_review": int(flags_open),
            "prescan": prescan,
            "pixel_size_check": pixel,
        },
        "methods": methods,
        "basis": basis,
        "differential": _diff_dict(final),
        "machine_differential": _diff_dict(machine_diff),
        "review": review,
        "flags": flags,
        "class_labels": taxonomy.labels,
        # Set when a sign-off issues this report (freeze_report), None while preliminary.
        "issue": None,
        "laboratory": cfg.review.laboratory,
        "statement": cfg.review.report_statement,
    }


def _last_sign_event(s: Session, slide_id: int) -> dict[str, Any]:
    """What the slide's latest sign-off audit event kept (``after``: the role signed under,
    whether every counted cell was looked at); {} when there is none."""
    return s.scalar(select(AuditEvent.after).where(
        AuditEvent.slide_id == slide_id, AuditEvent.action == "sign")
        .order_by(AuditEvent.id.desc()).limit(1)) or {}


def _sign_offs(s: Session, slide_id: int) -> list[Review]:
    """A slide's sign-offs in the order they were made: issue 1 first."""
    return list(s.scalars(select(Review).where(Review.slide_id == slide_id,
                                               Review.action == "sign")
                          .order_by(Review.id)))


def freeze_report(store: Store, slide_id: int, cfg: Any, at_sign_off: bool = False
                  ) -> dict[str, Any] | None:
    """Keep the report of a signed slide's latest sign-off as issued, once; returns the kept
    report (one kept before: that one, even of a slide reopened since), or None when there is
    none and the slide is not signed, or was reopened or signed again while it was built.

    The review app calls it right after signing (``at_sign_off``) and before a reopening;
    a report printed for a signed slide whose copy is missing (signed before reports were
    kept, or the first try failed) is kept then, and says so (``issue.kept_at_sign_off``
    false: its figures follow the settings of that moment, not of the signature).
    An issue after the first is an amended report: ``issue.amends`` names the one it replaces,
    the reopening that led to it and the counts it gave."""
    with store.session() as s:
        signs = _sign_offs(s, slide_id)
        if not signs or signs[-1].report is not None:
            return signs[-1].report if signs else None
        sign_id = signs[-1].id
    rep = build_report(store, slide_id, cfg)
    with store.session() as s:
        slide = lock_slide(s, slide_id)
        if slide is None or slide.status != "signed":
            return None
        signs = _sign_offs(s, slide_id)
        last = signs[-1]
        if last.report is not None:
            return last.report
        if last.id != sign_id:  # reopened and signed again meanwhile: that one keeps its own
            return None
        amends = None
        if len(signs) > 1:
            prev = signs[-2]
            reopen = s.scalar(select(Review).where(
                Review.slide_id == slide_id, Review.action == "reopen", Review.id > prev.id,
                Review.id < last.id).order_by(Review.id.desc()).limit(1))
            # A case edited while reopened may move the result to another patient: the
            # amendment must say so, not only "counts unchanged".
            was = ((prev.report or {}).get("slide") or {}).get("case") or {}
            now = rep["slide"]["case"]
            case_changed = {k: [was.get(k), now.get(k)] for k in now
                            if prev.report is not None and was.get(k) != now.get(k)}
            amends = {"number": len(signs) - 1, "signed_by": prev.username,
                      "signed_at": iso_time(prev.at), "counts": prev.counts_after,
                      "reopened_by": reopen.username if reopen else None,
                      "reopened_at": iso_time(reopen.at) if reopen else None,
                      "reason": reopen.note if reopen else None,
                      "case_changed": case_changed}
        # The role signed under, as its audit event keeps it (a technician, or the
        # supervisor a lab's sign_roles ask for): a role changed later does not rewrite it.
        rep["issue"] = {"number": len(signs), "signed_by": last.username,
                        "signed_role": _last_sign_event(s, slide_id).get("role"),
                        "signed_at": iso_time(last.at), "kept_at_sign_off": at_sign_off,
                        "amends": amends}
        last.report = rep
        return rep


def issued_report(store: Store, slide_ref: int | str, cfg: Any, issue: int | None = None
                  ) -> dict[str, Any]:
    """The report to print: for a signed slide the one its sign-off issued, kept as it was;
    otherwise the preliminary report as the slide stands. ``issue`` (1 = the first sign-off)
    prints an earlier issue, also of a slide reopened since. The copy gets ``printed_at`` and,
    when it is no longer the slide's current report, ``superseded``: the issue that replaced
    it, or the reopening that withdrew it. Raises StoreError for an unknown slide or issue."""
    slide = store.slide(slide_ref)
    if issue is None and slide.status != "signed":
        return build_report(store, slide.id, cfg)
    with store.session() as s:
        signs = [(r.id, r.report, r.username, r.at) for r in _sign_offs(s, slide.id)]
        last_reopen = s.scalar(select(Review).where(
            Review.slide_id == slide.id, Review.action == "reopen")
            .order_by(Review.id.desc()).limit(1))
        cancel = s.scalar(select(Review).where(
            Review.slide_id == slide.id, Review.action == "cancel")
            .order_by(Review.id.desc()).limit(1))
    if issue is not None and not 1 <= issue <= len(signs):
        raise StoreError(f"slide {slide.name!r} has no issue {issue}: it was signed "
                         f"{len(signs)} time{'s' * (len(signs) != 1)}")
    number = issue or len(signs)
    rep = signs[number - 1][1]
    if rep is None and number == len(signs) and slide.status == "signed":
        rep = freeze_report(store, slide.id, cfg)
    if rep is None:
        raise StoreError(f"issue {number} of slide {slide.name!r} was signed before marrowcount "
                         "kept issued reports (or has been reopened since): only its counts "
                         "and sign-off are kept, in the review history")
    superseded = None
    if number < len(signs):
        _id, _rep, by, at = signs[number]
        superseded = {"by_issue": number + 1, "signed_by": by, "signed_at": iso_time(at)}
    elif last_reopen is not None and last_reopen.id > signs[-1][0]:
        superseded = {"by_issue": None, "reopened_by": last_reopen.username,
                      "reopened_at": iso_time(last_reopen.at), "reason": last_reopen.note}
        if cancel is not None and cancel.id > last_reopen.id:
            superseded |= {"cancelled_by": cancel.username, "cancelled_at": iso_time(cancel.at),
                           "cancel_reason": cancel.note}
    return {**rep, "printed_at": iso_time(datetime.now(timezone.utc)), "superseded": superseded}


def superseded_text(sup: dict[str, Any]) -> str:
    """The warning on a report that is no longer the slide's current one."""
    if sup["by_issue"] is not None:
        return (f"Replaced by issue {sup['by_issue']}, signed by {sup['signed_by']} at "
                f"{when_text(sup['signed_at'])}: this report is no longer valid")
    text = (f"Withdrawn: the slide was reopened by {sup['reopened_by']} at "
            f"{when_text(sup['reopened_at'])} (“{sup['reason']}”)")
    if sup.get("cancelled_by"):
        return (f"{text} and then cancelled by {sup['cancelled_by']} at "
                f"{when_text(sup['cancelled_at'])} (“{sup['cancel_reason']}”): no amended "
                "report will follow")
    return f"{text} and is under review again; an amended report will follow"


def report_csv(rep: dict[str, Any]) -> str:
    """A STATUS row (the slide's state, and in ``basis`` whose counts these are), an ISSUE
    row (which sign-off issued it), SUPERSEDED and PRINTED rows on a reprint no
    longer valid or printed again, one CASE row per case field (patient, specimen; value in
    ``value``), one row per class, then TOTAL, M:E and BLAST rows, with the machine count
    beside each and, where the laboratory set one, the reference interval and L/H; then the
    cells not counted, a REVIEW row (flagged cells and how many review checked, in ``n`` and
    ``value``; cells review left out, by reason), one METHOD row per method that
    analysed fields, and one FLAG row per flag of the report (what a reader must know:
    preliminary, target not reached, an interval across a blast threshold, …)."""
    rep = _rounded(rep)
    d, m = rep["differential"], rep["machine_differential"]
    machine_n = {c["name"]: c["n"] for c in m["classes"]}
    buf = io.StringIO()
    w = _SafeWriter(csv.writer(buf, lineterminator="\n"))
    w.writerow(["slide", "quantity", "label", "lineage", "n", "value", "ci_low", "ci_high",
                "unit", "machine_n", "basis", "ref_low", "ref_high", "outside"])
    s, basis = rep["slide"]["name"], rep["basis"]

    def ref(interval: list[float] | None, outside: str | None) -> list[Any]:
        return ["", "", ""] if interval is None else [*interval, outside or ""]

    w.writerow([s, "STATUS", rep["slide"]["status"].replace("_", " "), "", "", "", "", "", "",
                "", basis, *ref(None, None)])
    if (issue := rep.get("issue")) is not None:
        w.writerow([s, "ISSUE", issue_text(issue), "", issue["number"], issue["signed_at"], "",
                    "", "", "", basis, *ref(None, None)])
    if rep.get("superseded"):
        w.writerow([s, "SUPERSEDED", superseded_text(rep["superseded"]), "", "", "", "", "",
                    "", "", basis, *ref(None, None)])
    if rep.get("printed_at"):
        w.writerow([s, "PRINTED", "printed at (from the report as issued)", "", "",
                    rep["printed_at"], "", "", "", "", basis, *ref(None, None)])
    for key, value in rep["slide"]["case"].items():
        w.writerow([s, "CASE", key, "", "", "" if value is None else value, "", "", "", "",
                    basis, *ref(None, None)])
    # What ci_low / ci_high cover: a laboratory may set stats.confidence other than 0.95.
    w.writerow([s, "CONFIDENCE", f"{confidence_text(d['confidence'])} exact (Clopper–Pearson) "
                "intervals in ci_low / ci_high", "", "", d["confidence"], "", "", "", "",
                basis, *ref(None, None)])
    for c in d["classes"]:
        label = c["label"] + (f" {REVIEWER_ONLY}" if c.get("reviewer_only") else "")
        w.writerow([s, c["name"], label, c["lineage"], c["n"], c["pct"], c["ci_low_pct"],
                    c["ci_high_pct"], "%", machine_n.get(c["name"], 0), basis,
                    *ref(c["reference_pct"], c["outside"])])
    labels = rep.get("class_labels") or {}
    for name in d.get("not_reported", ()):  # a class the machine's count cannot hold
        w.writerow([s, name, f"{labels.get(name, name)} {REVIEWER_ONLY}: not reported until "
                    "review", "", "", "", "", "", "%", "", basis, *ref(None, None)])
    # Every row has the header's 14 columns; the reference columns stay empty where none apply.
    w.writerow([s, "TOTAL", "counted leukocytes", "", d["total"], "", "", "", "cells",
                m["total"], basis, *ref(None, None)])
    # Myeloid cells and no erythroid one: infinite, written "inf" (a number to a spreadsheet
    # or a LIS, where an empty cell would read as missing).
    infinite = d["me_ratio"] is None and bool(d["myeloid"])
    me_ci = (["", ""] if not d["me_ci"] else
             [x if x is not None else "inf" for x in d["me_ci"]])
    w.writerow([s, "M:E", _me_definition(rep), "",
                f"{d['myeloid']}:{d['erythroid']}",
                "inf" if infinite else "" if d["me_ratio"] is None else d["me_ratio"], *me_ci,
                "ratio", "", basis,
                *ref(d["me_reference"], d["me_outside"])])
    if d["blast_pct"] is not None:
        w.writerow([s, "BLAST", "blasts of all nucleated cells", "", d["blast_n"],
                    d["blast_pct"], *d["blast_ci_pct"], "%", m["blast_n"], basis,
                    *ref(None, None)])
    for name, n in sorted(d["not_counted"].items()):
        w.writerow([s, name, "not counted", "", n, "", "", "", "cells", "", basis,
                    *ref(None, None)])
    rv = rep["review"] or {}
    left_out = ", ".join(f"{n} {k}" for k, n in (rv.get("excluded") or {}).items())
    w.writerow([s, "REVIEW", f"flagged cells checked; left out by review: {left_out or 'none'}",
                "", rep["slide"]["cells_flagged"],
                rep["slide"]["cells_flagged"] - rep["slide"]["cells_needing_review"], "", "",
                "cells", "", basis, *ref(None, None)])
    sl = rep["slide"]
    w.writerow([s, "PIXEL", pixel_text(sl.get("pixel_size_check"), sl.get("um_per_px")), "",
                "", "" if sl.get("um_per_px") is None else sl["um_per_px"], "", "", "µm/px", "",
                basis, *ref(None, None)])
    for meth in rep["methods"]:
        w.writerow([s, "METHOD", method_text(meth), "", meth["fields"], "", "", "", "fields", "",
                    basis, *ref(None, None)])
    for f in rep["flags"]:
        w.writerow([s, "FLAG", f, "", "", "", "", "", "", "", basis, *ref(None, None)])
    for kind, text in (("LABORATORY", rep.get("laboratory")),
                       ("STATEMENT", rep.get("statement"))):
        if text:
            w.writerow([s, kind, text, "", "", "", "", "", "", "", basis, *ref(None, None)])
    return buf.getvalue()


class _SafeWriter:
    """A csv writer whose text cells cannot run as a spreadsheet formula: case fields and
    slide names are typed by people, and "=HYPERLINK(…)" would run when the lab opens the
    file (OWASP CSV injection); such a cell gets a leading apostrophe."""

    def __init__(self, writer: Any) -> None:
        self._w = writer

    def writerow(self, row: list[Any]) -> None:
        self._w.writerow([f"'{v}" if isinstance(v, str) and v[:1] in ("=", "+", "-", "@",
                                                                     "\t", "\r") else v
                          for v in row])


def report_pdf(rep: dict[str, Any], path: Path) -> None:
    """A one- or two-page A4 lab report (reportlab)."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.platypus import Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    st = getSampleStyleSheet()
    sl, d = rep["slide"], rep["differential"]
    conf = confidence_text(d["confidence"])
    case = sl["case"]
    issue, sup = rep.get("issue"), rep.get("superseded")
    warn = [text for text, show in ((superseded_text(sup) if sup else "", sup),
                                    (issue_text(issue) if issue else "",
                                     issue and issue["amends"])) if show]
    story: list[Any] = [
        *([Paragraph(_esc(rep["laboratory"]), st["Normal"])] if rep.get("laboratory") else []),
        Paragraph(f"Bone-marrow differential: {_esc(sl['name'])}", st["Title"]),
        *[Paragraph(f"<font color='#b00000'><b>{_esc(text)}</b></font>", st["Normal"])
          for text in warn],
        Paragraph(" · ".join(f"{CASE_LABELS[k]} <b>{_esc(v) if v is not None else '—'}</b>"
                             for k, v in case.items()), st["Normal"]),
        Paragraph(
            f"Status <b>{sl['status'].replace('_', ' ')}</b> · counts: {rep['basis']} · "
            f"{d['total']} leukocytes counted (target {sl['target']}) · taxonomy "
            f"{_esc(sl['taxonomy'])} · {sl['fields']} fields ({sl['fields_skipped']} skipped)"
            + (f" · {_esc(prescan_text(sl['prescan']))}" if sl["prescan"] else ""),
            st["Normal"]),
        Paragraph(f"Started {when_text(sl['started_at'])} · finished "
                  f"{when_text(sl['finished_at'])} · "
                  f"instrument {_esc(sl['instrument'] or '-')} · "
                  + (f"report generated {when_text(rep['generated_at'])}" if not issue else
                     f"issue {issue['number']}, issued {when_text(rep['generated_at'])}"
                     if issue["kept_at_sign_off"] else
                     f"issue {issue['number']}, signed {when_text(issue['signed_at'])}; this "
                     f"report was kept at {when_text(rep['generated_at'])}, after the "
                     "sign-off, under the settings of that time")
                  + (f" · printed {when_text(rep['printed_at'])}" if rep.get("printed_at")
                     else ""),
                  st["Normal"]),
        Paragraph(pixel_text(sl["pixel_size_check"], sl.get("um_per_px")), st["Normal"]),
        Spacer(1, 4 * mm),
    ]
    m_n = {c["name"]: c["n"] for c in rep["machine_differential"]["classes"]}
    # The reference columns only where the laboratory set intervals.
    has_ref = any(c["reference_pct"] for c in d["classes"])
    ref_head = ["Reference (%)", ""] if has_ref else []
    rows = [["Class", "Lineage", "n", "%", f"{conf} CI (%)", *ref_head, "machine n"]]
    for c in d["classes"]:
        ref = [reference_text(c["reference_pct"]), c["outside"] or ""] if has_ref else []
        rows.append([c["label"] + (" †" if c.get("reviewer_only") else ""), c["lineage"],
                     c["n"], value_text(c["pct"], 1, c["outside"], c["reference_pct"], 2),
                     interval_text(c["ci_low_pct"], c["ci_high_pct"], 1, " – "), *ref,
                     m_n.get(c["name"], 0)])
    rows.append(["Total", "", d["total"], "100.0" if d["total"] else "0.0", "",
                 *["" for _ in ref_head], rep["machine_differential"]["total"]])
    t = Table(rows, repeatRows=1, hAlign="LEFT")
    t.setStyle(TableStyle([
        ("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
        ("FONTNAME", (0, -1), (-1, -1), "Helvetica-Bold"),
        *([("FONTNAME", (6, 1), (6, -1), "Helvetica-Bold")] if has_ref else []),
        ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.black),
        ("LINEABOVE", (0, -1), (-1, -1), 0.6, colors.black),
        ("ALIGN", (2, 0), (-1, -1), "RIGHT"),
        ("ROWBACKGROUNDS", (0, 1), (-1, -2), [colors.white, colors.HexColor("#f2f2f2")]),
    ]))
    story.append(t)
    if any(c.get("reviewer_only") for c in d["classes"]):
        story.append(Paragraph("† named by a reviewer only: the model does not recognise this "
                               "class, so its machine count is always 0", st["Normal"]))
    if d.get("not_reported"):
        names = ", ".join(rep.get("class_labels", {}).get(n, n) for n in d["not_reported"])
        story.append(Paragraph(_esc(f"Not reported until review: {names} (named by a "
                                    "reviewer only; the model does not recognise them)."),
                               st["Normal"]))
    story.append(Spacer(1, 4 * mm))
    if not d["myeloid"] and not d["erythroid"]:
        me = "not defined (no myeloid or erythroid cells)"
    else:
        # A report kept before M:E had an interval without erythroid cells has none.
        me_ci = d["me_ci"] and [math.inf if x is None else x for x in d["me_ci"]]
        ratio = value_text(d["me_ratio"], 2, d["me_outside"], d["me_reference"], 3, missing="∞")
        me = (f"{ratio}"
              f"{' (no erythroid cells)' if d['me_ratio'] is None else ''} "
              + (f"({conf} CI {interval_text(*me_ci, 2, ' – ')})" if me_ci else "") + "; "
              f"myeloid {d['myeloid']}, erythroid {d['erythroid']}"
              + ("" if d["me_reference"] is None else
                 f"; reference {reference_text(d['me_reference'])}"
                 + (f" <b>{d['me_outside']}</b>" if d["me_outside"] else "")))
    story.append(Paragraph(f"<b>M:E ratio</b>: {me}", st["Normal"]))
    story.append(Paragraph(_esc(f"M:E counts {_me_definition(rep)}."), st["Normal"]))
    if d["blast_pct"] is None:
        blast = ("not reported until a reviewer has named the blasts (the model does not "
                 "recognise them)" if d.get("blast_reviewer_only") and d["total"]
                 else "not reported (no cell counted)" if not d["total"]
                 else "not reported (no blast class in this taxonomy)")
    else:
        blast = (f"{value_text(d['blast_pct'], 1)}% ({conf} CI "
                 f"{interval_text(*d['blast_ci_pct'], 1, ' – ')}%) of all nucleated cells, "
                 f"n = {d['blast_n']}"
                 + (", as named by the reviewer" if d.get("blast_reviewer_only") else ""))
    story.append(Paragraph(f"<b>Blasts</b>: {blast}", st["Normal"]))
    if d["not_counted"]:
        nc = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in sorted(d["not_counted"].items()))
        story.append(Paragraph(f"Not counted: {_esc(nc)}", st["Normal"]))
    story.append(Spacer(1, 4 * mm))
    story.append(Paragraph("Flags", st["Heading3"]))
    for f in rep["flags"] or ["none"]:
        story.append(Paragraph(f"• {_esc(f)}", st["Normal"]))
    rv = rep["review"]
    story.append(Paragraph("Review", st["Heading3"]))
    if sl.get("cells_flagged"):  # on every report, preliminary ones too
        left = sl["cells_needing_review"]
        story.append(Paragraph(
            f"{sl['cells_flagged']} cells flagged by the machine for review: "
            + (f"{left} not checked yet." if left else "all checked by the reviewer."),
            st["Normal"]))
    if rv is None:
        story.append(Paragraph("Not reviewed.", st["Normal"]))
    else:
        if rv["signed"]:
            said = f"Signed by <b>{_esc(rv['reviewer'])}</b> at {when_text(rv['signed_at'])}."
        elif rv["reviewer"]:
            said = (f"<b>Not signed</b>: reopened after {_esc(rv['reviewer'])} signed it at "
                    f"{when_text(rv['signed_at'])}; the counts below are the review as it "
                    "stands.")
        else:
            said = "<b>Not signed</b>: review in progress."
        story.append(Paragraph(said, st["Normal"]))
        # In the differential's order and words; a class the taxonomy lacks goes last.
        labels = {c["name"]: c["label"] for c in d["classes"]}
        labels.update({k: v for k, v in rep.get("class_labels", {}).items() if k not in labels})
        # An amended report also shows the counts of the issue it replaces.
        did: list[str] = []
        prev = issue["amends"] if issue and issue["amends"] else None
        cols = [rv["counts_before"], *([prev["counts"]] if prev else []), rv["counts_after"]]
        names = sorted(set().union(*cols),
                       key=lambda n: (list(labels).index(n) if n in labels else len(labels), n))
        marked = {c["name"] for c in d["classes"] if c.get("reviewer_only")}
        changed = [[labels.get(n, n.replace("_", " ")) + (" †" if n in marked else ""),
                    *(c.get(n, 0) for c in cols)] for n in names]
        head = ["Class", "before review", *([f"issue {prev['number']}"] if prev else []),
                "after review"]
        tb = Table([head] + changed, hAlign="LEFT")
        if prev and prev["counts"] == rv["counts_after"]:
            did.append(f"counts unchanged from issue {prev['number']}")
        tb.setStyle(TableStyle([("FONTNAME", (0, 0), (-1, 0), "Helvetica-Bold"),
                                ("LINEBELOW", (0, 0), (-1, 0), 0.6, colors.black),
                                ("ALIGN", (1, 0), (-1, -1), "RIGHT")]))
        story.append(tb)
        if rv.get("excluded"):
            did.append("left out of the count by review: " + ", ".join(
                f"{n} {EXCLUDE_REASONS.get(k, str(k).replace('_', ' ')).lower()}"
                for k, n in rv["excluded"].items()))
        for line in did:
            story.append(Paragraph(f"{_esc(line[0].upper() + line[1:])}.", st["Normal"]))
        # Sign-off comments and reopen reasons belong on the report: an amended report must
        # say why it was reopened.
        for h in rv["history"]:
            story.append(Paragraph(
                f"• {_esc(HISTORY_VERBS.get(h['action'], h['action']))} by "
                f"{_esc(h['username'])} at {when_text(h['at'])}"
                + (f": “{_esc(h['note'])}”" if h["note"] else ""), st["Normal"]))
    story.append(Paragraph("Method", st["Heading3"]))
    for m in rep["methods"]:
        story.append(Paragraph(f"• {_esc(method_text(m))}: {m['fields']} fields analysed",
                               st["Normal"]))
    if not rep["methods"]:
        story.append(Paragraph(f"• No field was analysed ({sl['fields_skipped']} of "
                               f"{sl['fields']} skipped).", st["Normal"]))
    story.append(Spacer(1, 6 * mm))
    story.append(Paragraph(
        "Intervals are exact (Clopper–Pearson). Percentages are of all counted nucleated cells; "
        "non-leukocytes and suppressed duplicates are left out. Reference intervals are the "
        "laboratory's own; L / H: the value lies below / above it. Produced by marrowcount; a "
        "machine count is preliminary until a qualified reviewer signs it.", st["Italic"]))
    if rep.get("statement"):
        story.append(Paragraph(f"<b>Intended use and limitations</b>: "
                               f"{_esc(rep['statement'])}", st["Italic"]))
    ids = " · ".join(f"{CASE_LABELS[k]} {case[k]}" for k in ("accession", "patient_id",
                                                              "patient_name") if case.get(k))
    state = ("preliminary, not signed" if not issue else
             f"signed amended report, issue {issue['number']}" if issue["amends"] else
             f"signed report, issue {issue['number']}")
    mark = (("REPLACED BY ISSUE %s: NOT VALID" % sup["by_issue"]) if sup and sup["by_issue"]
            else "WITHDRAWN: SLIDE REOPENED" if sup else None)
    write_whole(path, lambda tmp: SimpleDocTemplate(
        str(tmp), pagesize=A4, title=f"marrowcount report {sl['name']}", leftMargin=18 * mm,
        rightMargin=18 * mm, topMargin=16 * mm, bottomMargin=20 * mm).build(
            story, canvasmaker=_footed_canvas(state, " · ".join(x for x in (sl["name"], ids)
                                                                 if x), mark)))


def _footed_canvas(state: str, who: str, mark: str | None) -> type:
    """A reportlab canvas that puts on every page the report's state, the slide and patient
    (``who``, shortened to fit), "page X of Y" and, on a report no longer valid, a red mark:
    a page separated from the first must still say whose it is and whether it counts."""
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.units import mm
    from reportlab.pdfbase.pdfmetrics import stringWidth
    from reportlab.pdfgen.canvas import Canvas

    room = A4[0] - 36 * mm - 60  # between the margins, less "page X of Y"
    text = f"{state} · {who}"
    while len(text) > len(state) and stringWidth(text, "Helvetica", 7.5) > room:
        text = text[:-2] + "…"

    class FootedCanvas(Canvas):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._pages: list[dict[str, Any]] = []

        def showPage(self) -> None:  # noqa: N802  (reportlab's name)
            self._pages.append(dict(self.__dict__))
            self._startPage()

        def save(self) -> None:
            for page in self._pages:
                self.__dict__.update(page)
                self.setFont("Helvetica", 7.5)
                self.setFillColor(colors.black)
                self.drawString(18 * mm, 10 * mm, text)
                self.drawRightString(A4[0] - 18 * mm, 10 * mm,
                                     f"page {self._pageNumber} of {len(self._pages)}")
                if mark:
                    self.setFont("Helvetica-Bold", 9)
                    self.setFillColor(colors.HexColor("#b00000"))
                    self.drawString(18 * mm, 14 * mm, mark)
                super().showPage()
            super().save()

    return FootedCanvas


def write_report(store: Store, slide_ref: int | str, cfg: Any, fmt: str,
                 out: Path | None, issue: int | None = None
                 ) -> tuple[dict[str, Any], Path | None, str | None]:
    """Write the report (``issued_report``: a signed slide's as issued) as ``fmt``. Returns
    (report, path written, text).

    JSON and CSV go to ``out`` when given, else are returned as text; PDF needs ``out``
    (default ``<slide name>.pdf`` in the current folder)."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    rep = issued_report(store, slide_ref, cfg, issue)
    if fmt == "pdf":
        return rep, save_report(rep, fmt, out or Path(f"{file_safe(rep['slide']['name'])}.pdf")
                                ), None
    if out is not None:
        return rep, save_report(rep, fmt, out), None
    return rep, None, report_json(rep) if fmt == "json" else report_csv(rep)


def save_report(rep: dict[str, Any], fmt: str, path: Path) -> Path:
    """Write a built report as ``fmt`` (json, csv or pdf) to ``path``, whole or not at all."""
    if fmt == "pdf":
        report_pdf(rep, path)
        return path
    text = report_json(rep) if fmt == "json" else report_csv(rep)
    return write_whole(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def issue_text(issue: dict[str, Any]) -> str:
    """One line on which sign-off issued a report and, for an amended one, what it replaces."""
    role = f" ({issue['signed_role']})" if issue.get("signed_role") else ""
    text = (f"issue {issue['number']}, signed by {issue['signed_by']}{role} at "
            f"{when_text(issue['signed_at'])}")
    a = issue["amends"]
    if a is None:
        return text
    why = (f"; reopened by {a['reopened_by']} at {when_text(a['reopened_at'])}: "
           f"“{a['reason']}”" if a["reopened_by"] else "")
    changed = a.get("case_changed") or {}
    case = ("; CASE CHANGED since issue {}: {}".format(a["number"], "; ".join(
        f"{CASE_LABELS.get(k, k)} {old or '(none)'} → {new or '(none)'}"
        for k, (old, new) in changed.items())) if changed else "")
    return (f"Amended report, {text}; replaces issue {a['number']} signed by {a['signed_by']} "
            f"at {when_text(a['signed_at'])}{why}{case}")


def pixel_text(pixel: dict[str, Any] | None, stated: float | None = None) -> str:
    """One line on a slide's pixel size ``stated`` (µm/px) and its check
    (``pixel_size_checks``)."""
    if pixel is None:
        return ("Pixel size: not recorded" if stated is None else
                f"Pixel size {stated:.4g} µm/px: not checked against red cells")
    if pixel["estimate_um_per_px"] is None:
        return (f"Pixel size {pixel['stated_um_per_px']:.4g} µm/px: too few isolated red cells "
                f"in {pixel['fields']} fields to check it")
    verdict = "DISAGREES" if pixel["disagrees"] else "agrees"
    return (f"Pixel size {pixel['stated_um_per_px']:.4g} µm/px {verdict} with "
            f"{pixel['estimate_um_per_px']:.4g} from {pixel['red_cells']} red cells in "
            f"{pixel['fields']} fields")


def _esc(text: str) -> str:
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def file_safe(name: str) -> str:
    """A slide name as a file name (letters, digits, - _ . kept)."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "slide"
