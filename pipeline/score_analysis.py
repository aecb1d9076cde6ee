"""Score per-field analysis against a virtual slide's ground truth.

A true cell is a leukocyte of the truth file whose whole extent (its box in the truth: the
composited cell, lobes included; a disc of its radius when there is no box) lies inside the
field; cells cut by the field edge are *ignored* (the detector leaves them out by the seed's
border rule), and detections on them are neither right nor false. A detection belongs to the
true cell whose equal-area disc holds its centre (the nearest one when discs touch).

Per true cell, from **all** detections (the seed's four categories): ``correct`` (exactly
one), ``missing`` (none), ``multiple`` (more than one); ``false`` counts detections on no
leukocyte. From **counted** cells (after duplicate suppression, non-leukocytes left out):
``counted_once``, ``counted_twice`` (two or more), ``not_counted``; ``false_counted`` are
counted cells on no leukocyte. ``overall accuracy`` is the seed's figure: true cells counted
exactly once with the right class, over all true cells. The differential error compares each
class's share of the counted cells with its share of the true cells, in percentage points.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.analyze import CellResult


@dataclass(frozen=True)
class FieldWindow:
    """A field cut from the slide: top-left ``(x, y)`` and size ``(w, h)`` in slide pixels."""

    x: int
    y: int
    w: int
    h: int


@dataclass
class AnalysisScore:
    """Totals over scored fields (see module doc). ``confusion[(true, predicted)]`` counts
    true cells counted once; ``uncounted[true]`` true cells counted never;
    ``true_classes``/``counted_classes`` feed the differential."""

    fields: int = 0
    true_cells: int = 0
    ignored_edge_cells: int = 0
    correct: int = 0
    missing: int = 0
    multiple: int = 0
    false: int = 0
    detections: int = 0
    counted_once: int = 0
    counted_twice: int = 0
    not_counted: int = 0
    false_counted: int = 0
    duplicates_suppressed: int = 0
    duplicates_wrongly_suppressed: int = 0
    guided: int = 0
    guided_changed: int = 0
    needs_review: int = 0
    classified_right: int = 0
    classified: int = 0
    overall_right: int = 0
    seconds: float = 0.0
    confusion: Counter = field(default_factory=Counter)
    uncounted: Counter = field(default_factory=Counter)
    true_classes: Counter = field(default_factory=Counter)
    counted_classes: Counter = field(default_factory=Counter)

    @property
    def counted(self) -> int:
        return sum(self.counted_classes.values())

    def summary(self) -> dict[str, Any]:
        """Plain data: counts, rates (percent) and the per-class differential error."""
        t = max(self.true_cells, 1)
        counted = max(self.counted, 1)
        classes = sorted(set(self.true_classes) | set(self.counted_classes))
        diff = {
            c: {
                "true_pct": round(100 * self.true_classes[c] / t, 2),
                "counted_pct": round(100 * self.counted_classes[c] / counted, 2),
                "abs_error_pp": round(abs(100 * self.true_classes[c] / t
                                          - 100 * self.counted_classes[c] / counted), 2),
            }
            for c in classes
        }
        return {
            "fields": self.fields,
            "true_cells": self.true_cells,
            "ignored_edge_cells": self.ignored_edge_cells,
            "detection": {"correct": self.correct, "missing": self.missing,
                          "multiple": self.multiple, "false": self.false,
                          "detections": self.detections,
                          "accuracy_pct": round(100 * self.correct / t, 2)},
            "counting": {"counted": self.counted, "counted_once": self.counted_once,
                         "counted_twice": self.counted_twice, "not_counted": self.not_counted,
                         "false_counted": self.false_counted,
                         "counted_twice_pct": round(100 * self.counted_twice / t, 2)},
            "duplicates_suppressed": self.duplicates_suppressed,
            "duplicates_wrongly_suppressed": self.duplicates_wrongly_suppressed,
            "guided": self.guided,
            "guided_changed": self.guided_changed,
            "needs_review": self.needs_review,
            "classification_accuracy_pct": round(
                100 * self.classified_right / max(self.classified, 1), 2),
            "overall_accuracy_pct": round(100 * self.overall_right / t, 2),
            "differential": diff,
            "per_true_class": {
                c: {"true": self.true_classes[c], "not_counted": self.uncounted[c],
                    "counted_once_as": {p: n for (t_, p), n in sorted(self.confusion.items())
                                        if t_ == c}}
                for c in sorted(self.true_classes)},
            "max_differential_error_pp": max((d["abs_error_pp"] for d in diff.values()),
                                             default=0.0),
            "cells_per_s": round(self.detections / self.seconds, 1) if self.seconds else None,
        }


def _extent(c: dict[str, Any], um: float, win: FieldWindow) -> tuple[float, float, float, float]:
    """A truth cell's extent in field px: its box (the whole sprite, lobes included) when the
    truth has one, else its disc. A lobed neutrophil reaches well beyond its equal-area disc."""
    if "box" in c:
        x0, y0, x1, y1 = c["box"]
        return x0 - win.x, y0 - win.y, x1 - win.x, y1 - win.y
    r = c["r_um"] / um
    x, y = c["x"] - win.x, c["y"] - win.y
    return x - r, y - r, x + r, y + r


def true_cells_in(truth: dict[str, Any], win: FieldWindow) -> tuple[list[dict], int]:
    """Truth leukocytes wholly inside ``win`` (centres in field px), and how many the edge cuts."""
    um = float(truth["um_per_px"])
    inside, cut = [], 0
    for c in truth["cells"]:
        x0, y0, x1, y1 = _extent(c, um, win)
        if x1 <= 0 or y1 <= 0 or x0 >= win.w or y0 >= win.h:
            continue
        if x0 < 0 or y0 < 0 or x1 > win.w or y1 > win.h:
            cut += 1
            continue
        inside.append({**c, "fx": c["x"] - win.x, "fy": c["y"] - win.y, "r_px": c["r_um"] / um})
    return inside, cut


def _edge_cells(truth: dict[str, Any], win: FieldWindow) -> list[tuple[float, float, float, float]]:
    """Extents (field px) of the truth cells the field edge cuts."""
    um = float(truth["um_per_px"])
    out = []
    for c in truth["cells"]:
        x0, y0, x1, y1 = _extent(c, um, win)
        cut = x0 < 0 or y0 < 0 or x1 > win.w or y1 > win.h
        touches = not (x1 <= 0 or y1 <= 0 or x0 >= win.w or y0 >= win.h)
        if cut and touches:
            out.append((x0, y0, x1, y1))
    return out


def score_field(truth: dict[str, Any], win: FieldWindow, cells: Sequence[CellResult],
                scale: float, acc: AnalysisScore) -> None:
    """Add one field's results to ``acc``. ``scale``: slide px per field px (1 when the field
    was analysed at the slide's own pixel size)."""
    true, n_cut = true_cells_in(truth, win)
    edge = _edge_cells(truth, win)
    acc.fields += 1
    acc.true_cells += len(true)
    acc.ignored_edge_cells += n_cut
    tx = np.array([c["fx"] for c in true]) if true else np.zeros(0)
    ty = np.array([c["fy"] for c in true]) if true else np.zeros(0)
    tr = np.array([c["r_px"] for c in true]) if true else np.zeros(0)
    all_hits: list[list[CellResult]] = [[] for _ in true]
    counted_hits: list[list[CellResult]] = [[] for _ in true]
    owner: dict[int, int | None] = {}
    for cell in cells:
        x, y = cell.x * scale, cell.y * scale
        j = None
        if len(true):
            d = np.hypot(tx - x, ty - y)
            inside = np.flatnonzero(d <= tr)
            if inside.size:
                j = int(inside[np.argmin(d[inside])])
        owner[cell.index] = j
        on_edge = j is None and any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in edge)
        if on_edge:
            continue
        acc.detections += 1
        acc.guided += cell.guided
        acc.guided_changed += cell.guided and cell.first_label != cell.label
        acc.needs_review += cell.needs_review
        if cell.duplicate_of is not None:
            acc.duplicates_suppressed += 1
        if j is None:
            acc.false += 1
            acc.false_counted += cell.counted
        else:
            all_hits[j].append(cell)
            if cell.counted:
                counted_hits[j].append(cell)
        if cell.counted:
            acc.counted_classes[cell.label] += 1
    for cell in cells:
        if cell.duplicate_of is not None:
            a, b = owner.get(cell.index), owner.get(cell.duplicate_of)
            if a is not None and b is not None and a != b:
                acc.duplicates_wrongly_suppressed += 1
    for j, c in enumerate(true):
        acc.true_classes[c["class"]] += 1
        n = len(all_hits[j])
        acc.correct += n == 1
        acc.missing += n == 0
        acc.multiple += n > 1
        k = len(counted_hits[j])
        acc.counted_once += k == 1
        acc.counted_twice += k > 1
        acc.not_counted += k == 0
        acc.uncounted[c["class"]] += k == 0
        if k >= 1:
            label = max(counted_hits[j], key=lambda h: h.confidence).label
            acc.classified += 1
            acc.classified_right += label == c["class"]
            if k == 1:
                acc.confusion[(c["class"], label)] += 1
                acc.overall_right += label == c["class"]


def field_grid(truth: dict[str, Any], field_w: int, field_h: int) -> list[FieldWindow]:
    """Non-overlapping field windows (slide px) tiling the slide."""
    W, H = int(truth["width"]), int(truth["height"])
    return [FieldWindow(x, y, field_w, field_h)
            for y in range(0, H - field_h + 1, field_h)
            for x in range(0, W - field_w + 1, field_w)]


def choose_fields(truth: dict[str, Any], windows: Sequence[FieldWindow], min_cells: int,
                  max_fields: int | None, seed: int) -> list[FieldWindow]:
    """Fields in a seeded random order until they hold ``min_cells`` true cells (or
    ``max_fields`` fields)."""
    order = np.random.default_rng(seed).permutation(len(windows))
    out, total = [], 0
    for i in order:
        if total >= min_cells or (max_fields is not None and len(out) >= max_fields):
            break
        out.append(windows[i])
        total += len(true_cells_in(truth, windows[i])[0])
    return out


def evaluate(truth: dict[str, Any], fields: Sequence[FieldWindow],
             read_field: Callable[[FieldWindow], np.ndarray], field_um_per_px: float,
             analyze: Callable[[np.ndarray, float], list[CellResult]],
             on_field: Callable[[int, list[CellResult]], None] = lambda i, c: None,
             ) -> AnalysisScore:
    """Analyse each field (``read_field`` gives RGB at ``field_um_per_px``) and score it."""
    import time

    acc = AnalysisScore()
    scale = field_um_per_px / float(truth["um_per_px"])
    for i, win in enumerate(fields):
        rgb = read_field(win)
        t0 = time.perf_counter()
        cells = analyze(rgb, field_um_per_px)
        acc.seconds += time.perf_counter() - t0
        score_field(truth, win, cells, scale, acc)
        on_field(i, cells)
    return acc
