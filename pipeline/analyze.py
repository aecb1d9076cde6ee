"""One field in, the cells counted in it out: detect, classify, guide, suppress duplicates.

``analyze_field`` runs the seed's per-field chain:

1. **detect** leukocyte candidates (``pipeline.detect.detect``), each with a 96×96 crop at the
   classifier's working scale;
2. **classify** every crop in one batch;
3. **probability guidance**: a cell whose confidence is below ``guidance_threshold`` is
   re-cropped from the *field* at ``guidance_crops`` centres shifted by ``guidance_shift_um``
   (evenly around a circle), each also turned or flipped (``guidance_dihedral``: a cell has no
   orientation, and on real crops the turned views correct far more uncertain calls than
   shifts alone); all re-crops of all such cells go through the classifier in one
   batch, and the cell is decided from the mean of its original and re-cropped probabilities.
   The first and the final decision are both kept;
4. **duplicate suppression**: two cells closer than ``duplicate_distance_um`` (lobed classes:
   neutrophils, eosinophils; ``duplicate_distance_same_um`` per class for two cells both called
   a large class whose nucleus may be split, e.g. monocyte; ``duplicate_distance_other_um`` for
   other classes) whose labels are
   the same or form a configured pair (band/segmented neutrophil), and which look alike
   (cosine similarity of their probability vectors, each pair's classes pooled,
   ≥ ``duplicate_similarity``) or whose boxes
   overlap (intersection over the smaller box ≥ ``duplicate_overlap``), are one cell — most
   often the detached lobes of one neutrophil or eosinophil (``lobed_classes``). A lobe-sized
   nucleus (≤ ``lobe_max_um2``, or ≤ ``lobe_uncertain_max_um2`` when its own call stays below
   ``guidance_threshold``) within ``lobe_distance_um`` of a cell of a lobed class is taken as
   its lobe whatever it was called; two lobed-class calls whose nuclei are both at least
   ``two_nuclei_min_um2`` are two touching cells. The more confident one is kept; the other stays
   in the output with ``duplicate_of`` and ``duplicate_reason`` set and is not counted;
5. cells whose final confidence stays below ``review_threshold``, or that the classifier finds
   unlike every trained class, are flagged ``needs_review`` (never forced into a class); so
   is a ``non_leukocyte`` call on a nucleus of at least ``review_non_leukocyte_um2``, so a
   white cell the model mistakes for debris is not silently dropped.

``non_leukocyte`` cells are kept in the output but never counted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from pydantic import Field, model_validator

from pipeline.augment import dihedral
from pipeline.detect import DetectParams, detect
from pipeline.imaging import CROP_SIZE, as_rgb, check_scale, crop_at
from pipeline.params import Params

NON_LEUKOCYTE = "non_leukocyte"


class AnalyzeParams(Params):
    """The ``analysis:`` config section (defaults in config/default.yaml)."""

    guidance: bool = Field(description="re-crop and re-classify uncertain cells")
    guidance_threshold: float = Field(gt=0, le=1, description="guide below this confidence")
    guidance_crops: int = Field(ge=1, le=64, description="shifted re-crops per guided cell")
    guidance_shift_um: float = Field(gt=0, description="distance of each re-crop's centre")
    guidance_dihedral: bool = Field(
        description="also turn or flip each re-crop (re-crop m by the m-th of the 7 "
        "non-identity dihedral transforms): a cell on a smear has no orientation")
    review_threshold: float = Field(ge=0, le=1,
                                    description="final confidence below this: needs review")
    suppress_duplicates: bool
    lobed_classes: tuple[str, ...] = Field(
        description="classes whose nucleus comes in lobes a detector may find apart "
        "(neutrophils, eosinophils): they get duplicate_distance_um and the lobe rule")
    duplicate_distance_um: float = Field(
        ge=0, description="centres closer than this may be one cell, for lobed classes")
    duplicate_distance_other_um: float = Field(
        ge=0, description="the same for every other class (round cells touch at ~7-9 um)")
    duplicate_distance_same_um: dict[str, float] = Field(
        description="per class, for two cells both called it: centres closer than this may be "
        "one cell (a large cell whose nucleus the detector splits, e.g. a monocyte's folds)")
    duplicate_pairs: tuple[tuple[str, str], ...] = Field(
        description="different labels that may still be one cell (band/segmented neutrophil)")
    duplicate_similarity: float = Field(ge=-1, le=1,
                                        description="cosine similarity of probabilities")
    duplicate_overlap: float = Field(ge=0, le=1,
                                     description="box intersection over the smaller box")
    lobe_max_um2: float = Field(
        ge=0, description="a nucleus this small beside a lobed-class cell (neutrophil) is one of "
        "its lobes whatever its own call; 0 = off")
    lobe_distance_um: float = Field(ge=0, description="reach of that lobe rule")
    lobe_uncertain_max_um2: float = Field(
        ge=0, description="a nucleus up to this size beside a lobed-class cell is its lobe too "
        "when its own call stays below guidance_threshold (a real cell of that size there is "
        "called with confidence); 0 = off")
    two_nuclei_min_um2: float = Field(
        ge=0, description="two lobed-class calls whose nuclei are both at least this large are "
        "two touching cells, whatever their distance (a cell's lobes or halves are smaller); "
        "0 = off")
    review_non_leukocyte_um2: float = Field(
        ge=0, description="a non-leukocyte call on a nucleus this large goes to review: debris "
        "and platelets are smaller, a white cell from an unfamiliar stain often is not; 0 = off")

    @model_validator(mode="after")
    def _review_below_guidance(self) -> "AnalyzeParams":
        if self.review_threshold > self.guidance_threshold:
            raise ValueError("review_threshold must not exceed guidance_threshold")
        return self


class ClassifierLike(Protocol):
    """What analysis needs of ``pipeline.classify.Classifier``."""

    classes: tuple[str, ...]
    um_per_px: float

    def classify(self, crops: np.ndarray): ...


@dataclass(frozen=True)
class CellResult:
    """One detected cell after analysis.

    ``index``: position in the field's list (0-based); ``x, y``: centre in field pixels;
    ``box``: ``(x0, y0, x1, y1)`` field pixels, exclusive end; ``area_um2``: nucleus area;
    ``crop``: uint8 ``(96, 96, 3)`` at the classifier's scale; ``probabilities``: final class
    probabilities; ``first_label``: the decision before guidance; ``label``/``confidence``: the
    final decision; ``guided``: guidance ran; ``duplicate_of``: index of the kept cell when
    this one was suppressed, with ``duplicate_reason``; ``needs_review``: a person must decide.
    ``first_confidence`` and ``unknown`` add the pre-guidance confidence and the classifier's
    "unlike any trained class" flag.
    """

    index: int
    x: float
    y: float
    box: tuple[int, int, int, int]
    area_um2: float
    crop: np.ndarray
    probabilities: dict[str, float]
    first_label: str
    label: str
    confidence: float
    guided: bool
    duplicate_of: int | None
    duplicate_reason: str | None
    needs_review: bool
    first_confidence: float | None = None
    unknown: bool = False

    @property
    def counted(self) -> bool:
        """Counted in the differential: not a suppressed duplicate and a leukocyte."""
        return self.duplicate_of is None and self.label != NON_LEUKOCYTE

    def as_json(self) -> dict:
        """Plain JSON-ready data (no crop)."""
        return {
            "index": self.index, "x": round(self.x, 2), "y": round(self.y, 2),
            "box": list(self.box), "area_um2": round(self.area_um2, 2), "label": self.label,
            "confidence": round(self.confidence, 4),
            "probabilities": {k: round(v, 4) for k, v in self.probabilities.items()},
            "first_label": self.first_label,
            "first_confidence": None if self.first_confidence is None
            else round(self.first_confidence, 4),
            "guided": self.guided, "duplicate_of": self.duplicate_of,
            "duplicate_reason": self.duplicate_reason, "needs_review": self.needs_review,
            "unknown": self.unknown, "counted": self.counted,
        }


def shifted_centres(x: float, y: float, shift_px: float, k: int) -> list[tuple[float, float]]:
    """``k`` centres evenly on a circle of radius ``shift_px`` around ``(x, y)``."""
    ang = 2 * np.pi * (np.arange(k) + 0.5) / k
    return [(x + shift_px * float(np.cos(a)), y + shift_px * float(np.sin(a))) for a in ang]


def guidance_transforms(k: int) -> np.ndarray:
    """Dihedral transform (``pipeline.augment.dihedral`` code 1..7) of each of ``k`` re-crops:
    the identity is the cell's own first crop, so the re-crops cycle through the other seven."""
    return np.arange(k) % 7 + 1


def _guide(rgb: np.ndarray, um_per_px: float, classifier: ClassifierLike, pts: np.ndarray,
           probs: np.ndarray, conf: np.ndarray, unknown: np.ndarray,
           params: AnalyzeParams) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Average each uncertain cell's probabilities over shifted (and, with
    ``guidance_dihedral``, turned or flipped) re-crops from the field.

    ``pts`` float (N, 2) centres. Returns (probs, conf, unknown, guided) after guidance."""
    guided = np.zeros(len(pts), bool)
    if not params.guidance or len(pts) == 0:
        return probs, conf, unknown, guided
    todo = np.flatnonzero(conf < params.guidance_threshold)
    if todo.size == 0:
        return probs, conf, unknown, guided
    k = params.guidance_crops
    shift_px = params.guidance_shift_um / um_per_px
    crops = np.empty((todo.size * k, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    for j, i in enumerate(todo):
        for m, c in enumerate(shifted_centres(pts[i, 0], pts[i, 1], shift_px, k)):
            crops[j * k + m] = crop_at(rgb, um_per_px, c, classifier.um_per_px)
    if params.guidance_dihedral:
        crops = dihedral(crops, np.tile(guidance_transforms(k), todo.size))
    res = classifier.classify(crops)
    p_views = np.asarray(res.probs, np.float32).reshape(todo.size, k, -1)
    u_views = np.asarray(res.unknown, bool).reshape(todo.size, k)
    c_views = np.asarray(res.confidence, np.float32).reshape(todo.size, k)
    probs, conf, unknown = probs.copy(), conf.copy(), unknown.copy()
    mean = (probs[todo] + p_views.sum(1)) / (k + 1)
    probs[todo] = mean
    # Unknown by majority of the views; an unknown cell keeps the lowered confidence.
    unk = (unknown[todo].astype(int) + u_views.sum(1)) * 2 > k + 1
    lowered = (conf[todo] + c_views.sum(1)) / (k + 1)
    conf[todo] = np.where(unk, np.minimum(mean.max(1), lowered), mean.max(1))
    unknown[todo] = unk
    guided[todo] = True
    return probs, conf, unknown, guided


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    small = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return iw * ih / max(small, 1)


def find_duplicates(pts: np.ndarray, boxes: list[tuple[int, int, int, int]],
                    areas_um2: np.ndarray, classes: tuple[str, ...], probs: np.ndarray,
                    conf: np.ndarray, um_per_px: float,
                    params: AnalyzeParams) -> dict[int, tuple[int, str]]:
    """Which cells are second detections of another: ``{index: (kept index, reason)}``.

    ``pts`` float (N, 2) centres in px, ``areas_um2`` (N) nucleus areas, ``probs`` float (N, K)
    over ``classes``, ``conf`` (N). Besides the class-and-likeness rule, a lobe-sized nucleus
    (``lobe_max_um2``) within the distance of a lobed-class cell is taken as one of
    its lobes even when called otherwise: a lone lobe looks like a small round nucleus.

    Pairs are visited closest first; a cell already suppressed is not used again, so each
    group of fragments collapses onto its most confident member.
    """
    n = len(pts)
    if not params.suppress_duplicates or n < 2:
        return {}
    labels = [classes[i] for i in probs.argmax(1)]
    pairs = {frozenset(p) for p in params.duplicate_pairs}
    d_um = np.hypot(*(pts[:, None, :] - pts[None, :, :]).transpose(2, 0, 1)) * um_per_px
    # Compare appearance with each pair's classes pooled, so a lobe called band and its cell
    # called segmented still look alike.
    pooled = probs.copy()
    for a, b in params.duplicate_pairs:
        if a in classes and b in classes:
            ia, ib = classes.index(a), classes.index(b)
            pooled[:, ia] += pooled[:, ib]
            pooled[:, ib] = 0
    unit = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-9)
    cos = unit @ unit.T
    same_class = params.duplicate_distance_same_um
    reach = max(params.duplicate_distance_um, params.duplicate_distance_other_um,
                params.lobe_distance_um, *same_class.values())
    cand = [(d_um[i, j], i, j) for i in range(n) for j in range(i + 1, n) if d_um[i, j] < reach]
    lobed = set(params.lobed_classes)
    out: dict[int, tuple[int, str]] = {}
    for d, i, j in sorted(cand):
        if i in out or j in out:
            continue
        # A lobe-sized nucleus beside a lobed cell: the lobed cell is kept.
        lobe = None
        for a, b in ((i, j), (j, i)) if d < params.lobe_distance_um else ():
            small = areas_um2[b] <= params.lobe_max_um2 or (
                areas_um2[b] <= params.lobe_uncertain_max_um2
                and conf[b] < params.guidance_threshold)
            if labels[a] in lobed and small and areas_um2[b] < areas_um2[a]:
                lobe = (a, b)
                break
        if lobe is not None:
            keep, drop = lobe
            out[drop] = (keep, f"{d:.1f} um from {labels[keep]} {keep}, lobe-sized nucleus "
                               f"({areas_um2[drop]:.0f} um2, called {labels[drop]})")
            continue
        if NON_LEUKOCYTE in (labels[i], labels[j]):
            continue
        same = labels[i] == labels[j]
        if labels[i] in lobed and labels[j] in lobed:
            if min(areas_um2[i], areas_um2[j]) >= params.two_nuclei_min_um2 > 0:
                continue  # each is a whole nucleus: two touching cells, not one cell's lobes
            limit = params.duplicate_distance_um
        elif same and labels[i] in same_class:
            limit = same_class[labels[i]]
        else:
            limit = params.duplicate_distance_other_um
        if d >= limit:
            continue
        if not same and frozenset((labels[i], labels[j])) not in pairs:
            continue
        ov = _overlap(boxes[i], boxes[j])
        if cos[i, j] < params.duplicate_similarity and ov < params.duplicate_overlap:
            continue
        keep, drop = (i, j) if conf[i] >= conf[j] else (j, i)
        kind = "same class" if same else "neutrophil pair"
        out[drop] = (keep, f"{d:.1f} um from cell {keep}, {kind}, "
                           f"similarity {cos[i, j]:.2f}, overlap {ov:.2f}")
    return out


def analyze_field(rgb: np.ndarray, um_per_px: float, classifier: ClassifierLike,
                  detect_params: DetectParams, params: AnalyzeParams) -> list[CellResult]:
    """Detect, classify (one batch), guide and de-duplicate the cells of one field.

    ``rgb``: uint8 ``(H, W, 3)`` at ``um_per_px``. Returns one CellResult per detection, in
    detection order (top to bottom); suppressed duplicates and non-leukocytes are included
    and marked (see ``CellResult.counted``).
    """
    rgb = as_rgb(rgb)
    um_per_px = check_scale(um_per_px)
    dets = detect(rgb, um_per_px, detect_params, classifier.um_per_px)
    if not dets:
        return []
    classes = tuple(classifier.classes)
    res = classifier.classify(np.stack([d.crop for d in dets]))
    first_probs = np.asarray(res.probs, np.float32)
    first_conf = np.asarray(res.confidence, np.float32)
    first_unknown = np.asarray(res.unknown, bool)
    pts = np.array([(d.x, d.y) for d in dets], np.float64)
    probs, conf, unknown, guided = _guide(rgb, um_per_px, classifier, pts, first_probs,
                                          first_conf, first_unknown, params)
    labels = [classes[i] for i in probs.argmax(1)]
    dups = find_duplicates(pts, [d.box for d in dets], np.array([d.area_um2 for d in dets]),
                           classes, probs, conf, um_per_px, params)
    out = []
    for i, d in enumerate(dets):
        keep, reason = dups.get(i, (None, None))
        out.append(CellResult(
            index=i, x=float(d.x), y=float(d.y), box=tuple(int(v) for v in d.box),
            area_um2=float(d.area_um2), crop=d.crop,
            probabilities={c: float(p) for c, p in zip(classes, probs[i])},
            first_label=classes[int(first_probs[i].argmax())], label=labels[i],
            confidence=float(conf[i]), guided=bool(guided[i]), duplicate_of=keep,
            duplicate_reason=reason,
            needs_review=bool(unknown[i] or conf[i] < params.review_threshold
                              or (labels[i] == NON_LEUKOCYTE and params.review_non_leukocyte_um2
                                  and d.area_um2 >= params.review_non_leukocyte_um2)),
            first_confidence=float(first_conf[i]), unknown=bool(unknown[i]),
        ))
    return out
