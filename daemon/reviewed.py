"""What reviewers signed, put to work: the lab's own measure of the machine, and its own
training data.

The cells of a lab's own signed slides are the only honest measure of how the shipped (or a
retrained) model does on that lab's stain, camera and patients. ``reviewed_cells`` reads them;
``agreement`` scores the machine's calls against the reviewers' final calls, per class and per
slide; ``export_reviewed`` writes them as a folder-per-class tree, the ``folder`` source that
``marrowcount train`` reads, so a lab retrains on what its technicians signed.

A reviewer's final call is their class when they changed it, else the machine's (they saw it
and let it stand). A cell excluded as "not a leukocyte" is a ``non_leukocyte``; one excluded
as a smudge or a duplicate has no class. A cell the reviewer added is one the machine missed.
"""

from __future__ import annotations

import csv
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select

from daemon.models import Cell, Field, Slide
from daemon.provenance import method_text
from daemon.report import file_safe, slide_methods
from daemon.review.actions import final_label
from daemon.store import Store
from pipeline.errors import ImageError, MarrowError
from pipeline.evaluate_classifier import confusion, metrics
from pipeline.analyze import NON_LEUKOCYTE
from pipeline.taxonomy import Taxonomy

NONE = "none"
"""Confusion-matrix row of cells the reviewer left out without a class (smudge, duplicate),
and column of cells the machine missed (added by the reviewer)."""


class ReviewedError(MarrowError):
    """No signed slides to work with, or an export folder that is in use."""


@dataclass(frozen=True)
class ReviewedCell:
    """One cell of a signed slide. ``machine``: the machine's call, NONE when a reviewer added
    the cell; ``final``: the reviewer's final class, None when excluded as smudge/duplicate.
    ``x, y`` in pixels of the field image (``field_image``, relative to the data folder, None
    when fields were not kept) at ``field_um_per_px``; ``crop`` the stored crop at
    ``crop_um_per_px`` (None when not recorded)."""

    slide: str
    field_index: int
    cell_id: int
    index: int
    x: float
    y: float
    machine: str
    final: str | None
    field_image: str | None
    field_um_per_px: float
    crop: str | None
    crop_um_per_px: float | None


def signed_slides(store: Store, taxonomy: str, names: Sequence[str] = (),
                  since: datetime | None = None) -> list[Slide]:
    """Signed slides of ``taxonomy``, oldest signature first: those named (all must exist,
    be signed and use the taxonomy) or every one, optionally signed at or after ``since``."""
    with store.session() as s:
        q = select(Slide).where(Slide.status == "signed").order_by(Slide.signed_at, Slide.id)
        if names:
            found = {sl.name: sl for sl in s.scalars(select(Slide).where(Slide.name.in_(names)))}
            missing = [n for n in names if n not in found]
            if missing:
                raise ReviewedError(f"no slide named {', '.join(map(repr, missing))}")
            bad = [f"{n} ({found[n].status.replace('_', ' ')})" for n in names
                   if found[n].status != "signed"]
            if bad:
                raise ReviewedError(f"only signed slides count; not signed: {', '.join(bad)}")
            other = [f"{n} ({found[n].taxonomy})" for n in names if found[n].taxonomy != taxonomy]
            if other:
                raise ReviewedError(f"slides of another taxonomy than {taxonomy!r}: "
                                    f"{', '.join(other)}")
            q = q.where(Slide.name.in_(names))
        else:
            q = q.where(Slide.taxonomy == taxonomy)
        if since is not None:
            q = q.where(Slide.signed_at >= since)
        slides = list(s.scalars(q))
    if not slides:
        raise ReviewedError(f"no signed slides of taxonomy {taxonomy!r}"
                            + (f" signed since {since:%Y-%m-%d}" if since else ""))
    return slides


def slide_method_texts(store: Store, slides: Sequence[Slide]) -> dict[str, list[str]]:
    """Per slide name, the methods (software, model, settings: ``method_text``) its fields
    were counted with."""
    with store.session() as s:
        return {sl.name: [method_text(m) for m in slide_methods(s, sl.id)] for sl in slides}


def reviewed_cells(store: Store, slides: Sequence[Slide]) -> list[ReviewedCell]:
    """Every reviewable cell of ``slides`` (suppressed duplicates left out), in slide, field
    and cell order."""
    out: list[ReviewedCell] = []
    with store.session() as s:
        for slide in slides:
            rows = s.execute(
                select(Cell, Field).join(Field, Cell.field_id == Field.id)
                .where(Cell.slide_id == slide.id, Cell.duplicate_of.is_(None))
                .order_by(Field.index, Cell.index)).all()
            for cell, fld in rows:
                if cell.added_by and cell.excluded:
                    continue  # added, then undone: never a cell, neither missed nor excluded
                if cell.excluded:
                    final = NON_LEUKOCYTE if cell.exclude_reason == "not_leukocyte" else None
                else:
                    final = final_label(cell)
                crop_scale = (fld.method or {}).get("crop_um_per_px")
                out.append(ReviewedCell(
                    slide=slide.name, field_index=fld.index, cell_id=cell.id, index=cell.index,
                    x=cell.x, y=cell.y, machine=NONE if cell.added_by else cell.label,
                    final=final, field_image=fld.image_path, field_um_per_px=fld.um_per_px,
                    crop=cell.crop_path,
                    crop_um_per_px=None if crop_scale is None else float(crop_scale)))
    return out


def agreement(cells: Sequence[ReviewedCell], taxonomy: Taxonomy,
              methods: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """The machine's calls scored against the reviewers' final calls: how often review kept
    the machine's call. Reviewers see that call, so this is not accuracy against an
    independent count (a method comparison counts the same slides by hand).

    Returns plain data: ``classes`` (the taxonomy's, then NONE); ``confusion`` (rows the
    reviewer's final class, columns the machine's call); ``agreement`` (share of all cells
    where the two agree); ``kappa`` (Cohen's); ``per_class`` precision, recall (the machine's
    sensitivity for the reviewer's class), F1 and specificity, with ``n`` the reviewer's
    count; ``missed`` (cells reviewers added), ``excluded`` (counted by the machine, left out
    by a reviewer without a class); and ``slides``: per slide the number of calls changed and
    the largest change of a counted class's share of the differential, in points. With
    ``methods`` (``slide_method_texts``), each slide names its methods and ``methods`` lists
    every one with its number of slides: figures that pool several models or settings say so.
    """
    names = list(taxonomy.names)
    space = names + [NONE]
    idx = {c: i for i, c in enumerate(space)}
    # "Not a leukocyte" has no class of its own in a taxonomy without non_leukocyte.
    finals = [NONE if c.final is None or (c.final == NON_LEUKOCYTE and c.final not in idx)
              else c.final for c in cells]
    unknown = sorted(({c.machine for c in cells} | set(finals)) - set(space))
    if unknown:
        raise ReviewedError(f"calls {unknown} are not classes of taxonomy {taxonomy.name!r}")
    y_true = np.array([idx[f] for f in finals], np.int64)
    y_pred = np.array([idx[c.machine] for c in cells], np.int64)
    cm = confusion(y_true, y_pred, len(space))
    m = metrics(cm, space)
    total = cm.sum()
    observed, kappa = _agreement_kappa(cm)
    counted = set(taxonomy.counted)
    # The headline: cells either side counted. "Not a leukocyte" calls on debris and red
    # cells agree easily and in numbers, and lifted the all-cell figure (75% -> 87.5%).
    leuk = np.array([c.machine in counted or f in counted for c, f in zip(cells, finals)],
                    bool)
    leuk_cm = confusion(y_true[leuk], y_pred[leuk], len(space))
    leuk_observed, leuk_kappa = _agreement_kappa(leuk_cm)
    by_slide: dict[str, list[ReviewedCell]] = {}
    for c in cells:
        by_slide.setdefault(c.slide, []).append(c)
    slides = {}
    for name, mine in by_slide.items():
        before = Counter(c.machine for c in mine if c.machine in counted)
        after = Counter(c.final for c in mine if c.final in counted)
        nb, na = max(sum(before.values()), 1), max(sum(after.values()), 1)
        shift = {k: 100 * (after[k] / na - before[k] / nb) for k in counted}
        worst = max(shift, key=lambda k: abs(shift[k]))
        slides[name] = {"cells": len(mine), "changed": sum(c.machine != (c.final or NONE)
                                                           for c in mine),
                        "machine_counted": sum(before.values()),
                        "reviewed_counted": sum(after.values()),
                        "largest_share_change_pp": round(abs(shift[worst]), 2),
                        "largest_share_change_class": worst,
                        "methods": (methods or {}).get(name, [])}
    called = cm.sum(0)
    per_class = {}
    for c, v in m["per_class"].items():
        if c == NONE:
            continue
        # 0/0 is undefined, not 0 (a class the machine never called; a reviewer-only class
        # is never its call) and not NaN, which strict JSON readers refuse (every cell of
        # one class leaves no cell to be specific on).
        v = {k: None if isinstance(x, float) and math.isnan(x) else x for k, x in v.items()}
        if not called[idx[c]]:
            v = {**v, "precision": None, "f1": None}
        per_class[c] = {**v, "reviewer_only": True} if c in taxonomy.reviewer_only else v
    return {
        "classes": space,
        "cells": int(total),
        "agreement": None if observed is None else round(observed, 4),
        "kappa": None if kappa is None else round(kappa, 4),
        "leukocytes": {"cells": int(leuk.sum()),
                       "agreement": None if leuk_observed is None else round(leuk_observed, 4),
                       "kappa": None if leuk_kappa is None else round(leuk_kappa, 4)},
        "confusion": cm.tolist(),
        "per_class": per_class,
        "missed": int(cm[:, idx[NONE]].sum()),
        "excluded": int(cm[idx[NONE], :].sum()),
        "slides": slides,
        "methods": dict(Counter(t for v in slides.values() for t in v["methods"])),
    }


def _agreement_kappa(cm: np.ndarray) -> tuple[float | None, float | None]:
    """Observed agreement and Cohen's kappa of a confusion matrix; None where undefined (no
    cell; kappa when chance agreement is already certain: every cell one class on both sides)."""
    total = cm.sum()
    if not total:
        return None, None
    expected = float((cm.sum(0) * cm.sum(1)).sum()) / total ** 2
    observed = float(np.trace(cm)) / total
    return observed, (observed - expected) / (1 - expected) if expected < 1 else None


def export_reviewed(store: Store, cells: Sequence[ReviewedCell], out: Path, taxonomy: Taxonomy,
                    um_per_px: float, size: int) -> dict[str, Any]:
    """Write each cell with a final class of ``taxonomy`` to ``out/<class>/`` as a PNG of
    ``size``×``size`` px at ``um_per_px``, cut from its field image (so the window around the
    cell is real pixels, for training's shifted re-crops), or from its stored crop when the
    field was not kept; plus ``out/cells.csv`` (file, label, machine call, slide, field, cell
    id, image it came from). ``out`` must be new or empty, so an export never mixes with an
    older one. Cells without an image are counted in ``skipped`` by reason, not fatal.
    """
    from PIL import Image

    from pipeline.imaging import check_scale, crop_at, read_rgb

    check_scale(um_per_px)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ReviewedError(f"{out} exists and is not an empty folder; export to a new one")
    out.mkdir(parents=True, exist_ok=True)
    written: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    rows = []
    last: dict[str, np.ndarray | None] = {}  # cells come field by field: one image at a time

    def image(rel: str) -> np.ndarray | None:
        if rel not in last:
            last.clear()
            try:
                last[rel] = read_rgb(store.path(rel))
            except ImageError:
                last[rel] = None
        return last[rel]

    for c in cells:
        if c.final is None:
            skipped["excluded without a class"] += 1
            continue
        if c.final not in taxonomy.names:
            skipped[f"class {c.final!r} not in taxonomy"] += 1
            continue
        rgb, source = None, ""
        if c.field_image and (field := image(c.field_image)) is not None:
            rgb, source = crop_at(field, c.field_um_per_px, (c.x, c.y), um_per_px, size), "field"
        elif c.crop and c.crop_um_per_px and (crop := image(c.crop)) is not None:
            h, w = crop.shape[:2]
            rgb = crop_at(crop, c.crop_um_per_px, ((w - 1) / 2, (h - 1) / 2), um_per_px, size)
            source = "crop"
        if rgb is None:
            skipped["no readable field image or crop of known scale"] += 1
            continue
        # The cell id keeps two slide names that file-safe alike ("BM/1", "BM_1") apart.
        rel = Path(c.final) / (f"{file_safe(c.slide)}-f{c.field_index:05d}-c{c.index:04d}"
                               f"-{c.cell_id}.png")
        (out / c.final).mkdir(exist_ok=True)
        Image.fromarray(rgb).save(out / rel)
        written[c.final] += 1
        rows.append([rel.as_posix(), c.final, c.machine, c.slide, c.field_index, c.cell_id,
                     source])
    with open(out / "cells.csv", "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "machine_label", "slide", "field", "cell_id", "cut_from"])
        w.writerows(rows)
    return {"folder": str(out), "um_per_px": um_per_px, "size_px": size,
            "written": sum(written.values()), "per_class": dict(sorted(written.items())),
            "skipped": dict(skipped), "slides": len({c.slide for c in cells})}
