"""Virtual marrow slides: real labelled leukocytes composited onto a real RBC/plasma background.

No public marrow field is labelled per cell, so evaluation slides are built from real cells of
the PBC set (``../shared/data/pbc``) whose truth is known:

* every leukocyte is segmented from its own crop (nucleus seeds a GrabCut in a blue-stretched
  Lab space, so pale neutrophil cytoplasm stays with the cell) and pasted with a soft edge;
* the background is not drawn: single red cells are cut from the background of real crops and
  laid on the crops' own plasma colour; overlapping red cells add optical density as in a smear;
* platelets come from the PBC platelet crops, debris from fragments of real nuclei;
* density follows a smooth random field, so the slide has thin/empty areas, marrow-dense areas
  (5–60 leukocytes per 1388×1040 field) and touching clusters; stain strength and illumination
  drift mildly between regions;
* leukocytes are drawn only from the held-out part of each class (see :func:`heldout_rows`), so
  slides used for evaluation never contain a training cell.

Everything is drawn from one ``numpy.random.Generator`` seeded by ``seed``; the same seed and
parameters give the same pixels and truth. The slide is written as a tiled, pyramidal TIFF
(levels as successive pages, pixel size in the resolution tags and in the description) that
OpenSlide and tifffile read, beside a ground-truth JSON.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import Field, model_validator

from pipeline.errors import ImageError, MarrowError
from pipeline.imaging import read_rgb
from pipeline.params import Params

TRUTH_VERSION = 1
LEUKOCYTE_LAYER = "leukocyte"
DETACHABLE = ("band_neutrophil", "segmented_neutrophil")
"""Classes whose nucleus may be drawn with a detached lobe."""
LOBED = (*DETACHABLE, "eosinophil", "basophil")
"""Classes whose nucleus comes in lobes: several nuclear pieces are one cell."""


class SlideGenError(MarrowError):
    """The virtual slide cannot be built (missing data, impossible parameters)."""


class SlideGenParams(Params):
    """The ``slidegen:`` config section (defaults in config/default.yaml)."""

    pbc_dir: Path = Field(description="PBC data folder holding manifest.csv (relative: repo root)")
    source_um_per_px: float = Field(gt=0, description="pixel size of the PBC crops")
    um_per_px: float = Field(gt=0, description="pixel size of the slide written")
    width_px: int = Field(ge=256)
    height_px: int = Field(ge=256)
    field_px: tuple[int, int] = Field(description="field size (w, h) the densities refer to")
    leukocytes_per_field: tuple[float, float] = Field(
        description="leukocyte density range over the slide, per field"
    )
    empty_fraction: float = Field(ge=0, lt=1, description="share of the slide left thin/empty")
    cluster_probability: float = Field(ge=0, le=1, description="chance a cell starts a cluster")
    rbc_coverage: tuple[float, float] = Field(description="red-cell area cover range (1 = full)")
    platelets_per_field: tuple[float, float]
    debris_per_field: tuple[float, float]
    detached_lobe_fraction: float = Field(
        ge=0, le=1, description="share of band/segmented neutrophils drawn with a lobe pushed off")
    lobe_shift_um: float = Field(ge=0, description="how far a detached lobe is pushed out")
    second_cell_um: float = Field(
        ge=0, description="a crop of a one-nucleus class whose cut-out holds a second large "
        "nucleus this far from the first shows two cells under one label: left out; 0 = kept")
    size_jitter: float = Field(ge=0, lt=0.5, description="relative cell size jitter")
    stain_variation: float = Field(ge=0, lt=0.5, description="relative optical-density drift")
    illumination_variation: float = Field(ge=0, lt=0.5, description="relative brightness drift")
    noise_sigma: float = Field(ge=0, description="sensor noise, grey levels")
    class_mix: dict[str, float] = Field(min_length=1, description="leukocyte class shares")
    heldout_every: int = Field(ge=2, description="1 of this many cells per class is held out")
    split_seed: int
    background_crops: int = Field(ge=4, description="crops mined for red cells and plasma")
    tile_px: int = Field(ge=64, multiple_of=16)
    compression: str = Field(pattern="^(jpeg|deflate|none)$")
    jpeg_quality: int = Field(ge=50, le=100)

    @model_validator(mode="after")
    def _ranges(self) -> "SlideGenParams":
        for name in ("leukocytes_per_field", "rbc_coverage", "platelets_per_field",
                     "debris_per_field"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name}: need 0 <= low <= high, got {[lo, hi]}")
        if any(v < 0 for v in self.class_mix.values()) or sum(self.class_mix.values()) <= 0:
            raise ValueError("class_mix: shares must be >= 0 with a positive sum")
        return self


# ----------------------------------------------------------------------------------- split


def read_manifest(pbc_dir: Path) -> list[dict[str, str]]:
    """Rows of ``pbc_dir/manifest.csv`` (path, label, ..., sha1_original)."""
    path = Path(pbc_dir) / "manifest.csv"
    if not path.is_file():
        raise SlideGenError(f"{path}: PBC manifest not found (is the shared data present?)")
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def heldout_rows(rows: list[dict[str, str]], every: int, seed: int) -> list[dict[str, str]]:
    """The held-out 1-in-``every`` of each label, stratified and reproducible from ``seed``.

    Within a label the files are ordered by a hash of (seed, file hash) and every ``every``-th
    is held out, so each class keeps its share and the choice never depends on file order.
    """
    by_label: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_label.setdefault(row["label"], []).append(row)
    out: list[dict[str, str]] = []
    for label in sorted(by_label):
        ranked = sorted(
            by_label[label],
            key=lambda r: hashlib.sha1(f"{seed}:{r['sha1_original']}".encode()).hexdigest(),
        )
        out.extend(ranked[::every])
    return out


def classifier_split_paths(cfg: Any, part: str = "test") -> set[str]:
    """Resolved paths of one part (``test``, ``val`` or ``train``) of the classifier's split
    (``pipeline.datasets.split`` over the ``train.sources`` of ``cfg``, exactly as training
    draws it). A slide built from the test part never holds a cell the shipped model was
    trained or validated on; one built from the train part may be trained on."""
    from daemon.config import REPO_ROOT
    from pipeline.datasets import label_index, read_source, split

    samples = []
    for i, src in enumerate(cfg.train.sources):
        if src.train_only:
            continue  # never in val or test, and the others' split does not depend on them
        samples += read_source(src, REPO_ROOT, cfg.train.seed + i)
    index = label_index(cfg.classes.model_names)
    labels = np.array([index[x.label] for x in samples], dtype=np.int64)
    train_only = np.array([x.train_only for x in samples], dtype=bool)
    chosen = split(labels, cfg.train.seed, cfg.train.val_fraction, train_only)[part]
    return {str(Path(samples[i].path).resolve()) for i in chosen}


# --------------------------------------------------------------------------------- sprites


@dataclass(frozen=True)
class Sprite:
    """A cut-out object at slide scale: optical density ``od`` float32 (h, w, 3), soft
    ``alpha`` float32 (h, w) in [0, 1], and (for leukocytes) a ``nucleus`` bool mask."""

    od: np.ndarray
    alpha: np.ndarray
    nucleus: np.ndarray | None
    source: str

    def transformed(self, k: int) -> "Sprite":
        """One of the 8 dihedral transforms (k in 0..7)."""

        def t(a: np.ndarray | None) -> np.ndarray | None:
            if a is None:
                return None
            a = np.rot90(a, k % 4)
            return np.ascontiguousarray(a[:, ::-1] if k >= 4 else a)

        return Sprite(t(self.od), t(self.alpha), t(self.nucleus), self.source)

    def centroid(self) -> tuple[float, float]:
        ys, xs = np.nonzero(self.alpha > 0.5)
        if xs.size == 0:
            h, w = self.alpha.shape
            return (w - 1) / 2, (h - 1) / 2
        return float(xs.mean()), float(ys.mean())

    @property
    def radius_px(self) -> float:
        return float(np.sqrt((self.alpha > 0.5).sum() / np.pi))


def _plasma_rgb(rgb: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """Plasma colour of a crop: the median of its brightest, least saturated pixels."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    ok = np.ones(rgb.shape[:2], bool) if exclude is None else ~exclude
    v, s = hsv[..., 2].astype(np.float32), hsv[..., 1].astype(np.float32)
    score = v - s
    thr = np.percentile(score[ok], 80)
    sel = ok & (score >= thr)
    return np.median(rgb[sel].reshape(-1, 3), axis=0).astype(np.float32)


def _optical_density(rgb: np.ndarray, plasma: np.ndarray) -> np.ndarray:
    t = np.clip(rgb.astype(np.float32) / plasma[None, None, :], 1e-3, 1.0)
    return -np.log(t)


def segment_leukocyte(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Segment the central leukocyte of a PBC crop.

    ``rgb`` uint8 (H, W, 3). Returns (cell, nucleus) bool masks at full size, or None when no
    nucleus is found near the centre. The nucleus (blue minus green, Otsu) seeds a GrabCut run
    at half size on Lab with the blue-yellow axis stretched, where pale cytoplasm separates from
    red cells; the cell is the foreground part holding the central nucleus.
    """
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    hh, ww = small.shape[:2]
    n, lab, stats, cen = cv2.connectedComponentsWithStats(_stained_nuclei(small))
    d = np.hypot(cen[:, 0] - ww / 2, cen[:, 1] - hh / 2)
    central = [i for i in range(1, n) if d[i] < ww * 0.3 and stats[i, 4] > 20]
    if not central:
        return None
    seed = np.isin(lab, central)
    mask = np.full((hh, ww), cv2.GC_PR_BGD, np.uint8)
    yy, xx = np.mgrid[:hh, :ww]
    mask[np.hypot(xx - ww / 2, yy - hh / 2) < ww * 0.38] = cv2.GC_PR_FGD
    mask[seed] = cv2.GC_FGD
    mask[:4, :] = mask[-4:, :] = mask[:, :4] = mask[:, -4:] = cv2.GC_BGD
    labf = cv2.cvtColor(small, cv2.COLOR_RGB2LAB).astype(np.float32)
    labf[..., 2] = np.clip(128 + (labf[..., 2] - 128) * 3, 0, 255)
    labf[..., 0] *= 0.5
    cv2.setRNGSeed(0)  # GrabCut's k-means draws from OpenCV's global RNG: pin it.
    cv2.grabCut(labf.astype(np.uint8), mask, None, np.zeros((1, 65)), np.zeros((1, 65)), 3,
                cv2.GC_INIT_WITH_MASK)
    fg = ((mask == cv2.GC_FGD) | (mask == cv2.GC_PR_FGD)).astype(np.uint8)
    _, flab = cv2.connectedComponents(fg)
    ids = np.unique(flab[seed])
    fg = np.isin(flab, ids[ids > 0]).astype(np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, np.ones((5, 5), np.uint8))
    cell = cv2.resize(fg * 255, (w, h), interpolation=cv2.INTER_LINEAR) > 127
    nucleus = cv2.resize(seed.astype(np.uint8) * 255, (w, h), interpolation=cv2.INTER_LINEAR)
    return cell, (nucleus > 127) & cell


def _stained_nuclei(rgb: np.ndarray) -> np.ndarray:
    """uint8 mask (0/255) of nucleus-stained pixels: blue minus green above Otsu, opened."""
    s = rgb.astype(np.int16)
    blue = np.clip(s[..., 2] - s[..., 1], 0, 255).astype(np.uint8)
    _, nuc = cv2.threshold(blue, 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return cv2.morphologyEx(nuc, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))


def nuclei_in_cell(rgb: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Bool mask of every stained nucleus inside the bool ``cell`` mask of crop ``rgb``
    (H, W, 3), not only the central one: a neighbour touching the cell comes out with it."""
    h, w = rgb.shape[:2]
    small = cv2.resize(rgb, (w // 2, h // 2), interpolation=cv2.INTER_AREA)
    nuc = cv2.resize(_stained_nuclei(small), (w, h), interpolation=cv2.INTER_LINEAR)
    return (nuc > 127) & cell


def second_nucleus_um(nucleus: np.ndarray, um_per_px: float, min_um2: float = 15.0,
                      min_share: float = 0.3) -> float:
    """Distance (µm) between the centres of the two largest pieces of a bool nucleus mask when
    the second is a nucleus in its own right (at least ``min_um2`` and ``min_share`` of the
    largest); 0 when there is one nucleus."""
    n, _, stats, cen = cv2.connectedComponentsWithStats(nucleus.astype(np.uint8))
    order = np.argsort(-stats[1:, 4]) + 1
    if n < 3:
        return 0.0
    a, b = order[:2]
    if stats[b, 4] * um_per_px**2 < min_um2 or stats[b, 4] < min_share * stats[a, 4]:
        return 0.0
    return float(np.hypot(*(cen[a] - cen[b]))) * um_per_px


def detach_lobes(rgb: np.ndarray, cell: np.ndarray, nucleus: np.ndarray, shift_px: float,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Push the outermost nuclear lobe of a real neutrophil ``shift_px`` further out.

    Marrow neutrophils often show lobes joined only by invisible filaments, which a detector
    sees as separate nuclei. The lobes are found by eroding the nucleus until it falls apart;
    the lobe farthest from the nucleus centre moves radially with the cytoplasm around it, and
    the place it left is filled from the surrounding cytoplasm (inpainting). Returns the new
    (rgb, cell, nucleus), or None when the nucleus is a single lobe.
    """
    from scipy import ndimage

    nuc = nucleus.astype(np.uint8)
    k = np.ones((3, 3), np.uint8)
    markers, n = None, 0
    for it in range(1, 12):
        er = cv2.erode(nuc, k, iterations=it)
        n, lab, stats, _ = cv2.connectedComponentsWithStats(er)
        big = [i for i in range(1, n) if stats[i, 4] >= 30]
        if len(big) >= 2:
            markers = np.where(np.isin(lab, big), lab, 0)
            break
        if not big:
            return None
    if markers is None:
        return None
    # Every nucleus pixel joins its nearest eroded lobe.
    _, (iy, ix) = ndimage.distance_transform_edt(markers == 0, return_indices=True)
    lobes = np.where(nucleus, markers[iy, ix], 0)
    ys, xs = np.nonzero(nucleus)
    cy, cx = ys.mean(), xs.mean()
    ids = [i for i in np.unique(lobes) if i > 0]
    cents = {i: np.argwhere(lobes == i).mean(0) for i in ids}
    far = max(ids, key=lambda i: np.hypot(*(cents[i] - (cy, cx))))
    d = cents[far] - (cy, cx)
    d = d / max(np.hypot(*d), 1e-6)
    dy, dx = d * shift_px
    lobe = lobes == far
    # The lobe takes a rim of its own cytoplasm along (about half the shift), not other lobes.
    r = max(1, int(shift_px / 2))
    others = cv2.dilate((nucleus & ~lobe).astype(np.uint8), k, iterations=2).astype(bool)
    carry = cv2.dilate(lobe.astype(np.uint8), cv2.getStructuringElement(
        cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))).astype(bool) & cell & ~others
    m = np.float32([[1, 0, dx], [0, 1, dy]])
    h, w = cell.shape
    moved_rgb = cv2.warpAffine(rgb, m, (w, h), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_REFLECT_101)
    moved = cv2.warpAffine(carry.astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST) > 0
    moved_lobe = cv2.warpAffine(lobe.astype(np.uint8), m, (w, h), flags=cv2.INTER_NEAREST) > 0
    hole = cv2.dilate(lobe.astype(np.uint8), k, iterations=3)
    out = cv2.inpaint(rgb, hole, 5, cv2.INPAINT_TELEA)
    out[moved] = moved_rgb[moved]
    new_nucleus = (nucleus & ~lobe) | moved_lobe
    return out, cell | moved, new_nucleus


def _soft_sprite(rgb: np.ndarray, mask: np.ndarray, plasma: np.ndarray, scale: float,
                 feather_px: float, source: str, nucleus: np.ndarray | None = None) -> Sprite:
    """Cut ``mask``'s bounding box (with margin), soften its edge and rescale by ``scale``."""
    ys, xs = np.nonzero(mask)
    m = int(np.ceil(3 * feather_px)) + 2
    y0, y1 = max(0, ys.min() - m), min(mask.shape[0], ys.max() + m + 1)
    x0, x1 = max(0, xs.min() - m), min(mask.shape[1], xs.max() + m + 1)
    od = _optical_density(rgb[y0:y1, x0:x1], plasma)
    alpha = cv2.GaussianBlur(mask[y0:y1, x0:x1].astype(np.float32), (0, 0), feather_px)
    size = (max(2, round((x1 - x0) * scale)), max(2, round((y1 - y0) * scale)))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    od = cv2.resize(od, size, interpolation=interp)
    alpha = np.clip(cv2.resize(alpha, size, interpolation=interp), 0, 1)
    nuc = None
    if nucleus is not None:
        nuc = cv2.resize(nucleus[y0:y1, x0:x1].astype(np.uint8), size,
                         interpolation=cv2.INTER_NEAREST) > 0
    return Sprite(od.astype(np.float32), alpha.astype(np.float32), nuc, source)


def red_cell_sprites(rgb: np.ndarray, um_per_px: float, scale: float,
                     source: str) -> tuple[list[Sprite], np.ndarray]:
    """Single, whole red cells from a crop's background, and the crop's plasma colour.

    Red cells are the non-plasma pixels (Otsu on green, nuclei left out of the threshold);
    only compact blobs of one red cell's size (7.5 µm across, ±40% area) that hold no nuclear
    stain and are clear of the crop edge are kept, so the leukocyte and cut
    cells are left out; clumps of touching cells are split at their watershed first.
    ``um_per_px`` is the crop's pixel size, ``scale`` the resize to the
    slide.
    """
    plasma = _plasma_rgb(rgb)
    green = rgb[..., 1]
    light = green[green > 120]
    thr, _ = cv2.threshold(light.reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    dark = ((green < thr) * 255).astype(np.uint8)
    dark = cv2.morphologyEx(dark, cv2.MORPH_CLOSE, np.ones((7, 7), np.uint8))
    dark = _fill_holes(dark > 0)
    blue = rgb[..., 2].astype(np.int16) - rgb[..., 1].astype(np.int16) > 60
    n, lab, stats, _ = cv2.connectedComponentsWithStats(dark.astype(np.uint8))
    h, w = dark.shape
    expect = np.pi * (3.75 / um_per_px) ** 2
    sprites = []
    for i in range(1, n):
        x, y, bw, bh, area = stats[i]
        if x <= 1 or y <= 1 or x + bw >= w - 1 or y + bh >= h - 1 or area < 0.6 * expect:
            continue
        comp = lab == i
        if (comp & blue).sum() > 20:
            continue  # a nucleus: the leukocyte or a platelet on a red cell
        pieces = [comp] if area <= 1.4 * expect else _split_touching(comp, expect)
        for piece in pieces:
            a = int(piece.sum())
            ys, xs = np.nonzero(piece)
            pw, ph = np.ptp(xs) + 1, np.ptp(ys) + 1
            if not 0.6 * expect <= a <= 1.4 * expect or not 0.7 < pw / ph < 1.4:
                continue
            hull = cv2.convexHull(np.column_stack([xs, ys]).astype(np.int32))
            if a / max(cv2.contourArea(hull), 1.0) < 0.93:
                continue
            sprites.append(_soft_sprite(rgb, piece, plasma, scale, 1.2, source))
    return sprites, plasma


def _split_touching(comp: np.ndarray, expect_area: float) -> list[np.ndarray]:
    """Split a clump of touching red cells at the watershed of its distance transform."""
    m = comp.astype(np.uint8)
    dist = cv2.distanceTransform(m, cv2.DIST_L2, 5)
    r = np.sqrt(expect_area / np.pi)
    _, seeds = cv2.connectedComponents((dist > 0.6 * r).astype(np.uint8))
    if seeds.max() < 2:
        return []
    markers = seeds.astype(np.int32)
    markers[m == 0] = -1  # outside stays out; watershed only floods the clump
    markers[(m > 0) & (seeds == 0)] = 0
    img = cv2.cvtColor((255 - np.clip(dist * 255 / max(dist.max(), 1), 0, 255)).astype(np.uint8),
                       cv2.COLOR_GRAY2BGR)
    cv2.watershed(img, markers)
    pieces = []
    for k in range(1, seeds.max() + 1):
        piece = markers == k
        piece = cv2.erode(piece.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0  # off the line
        if piece.any():
            pieces.append(piece)
    return pieces


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.uint8)
    h, w = m.shape
    flood = np.pad(m, 1)
    cv2.floodFill(flood, None, (0, 0), 2)
    return (flood[1:-1, 1:-1] != 2) | mask


# ---------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Placed:
    """An object on the slide: sprite index into its pool, dihedral ``k``, top-left px."""

    layer: str  # "rbc", "platelet", "debris", "leukocyte"
    sprite: Sprite
    x0: int
    y0: int


@dataclass(frozen=True)
class VirtualSlide:
    """A rendered slide: RGB uint8 (H, W, 3), pixel size, and the truth as plain data."""

    rgb: np.ndarray
    um_per_px: float
    truth: dict[str, Any]


def _smooth_field(rng: np.random.Generator, h: int, w: int, cell_px: float) -> Callable:
    """A smooth random field with values in [0, 1] (uniform marginal), sampled by (x, y)."""
    step = 128.0
    gh, gw = int(np.ceil(h / step)) + 1, int(np.ceil(w / step)) + 1
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    g = cv2.GaussianBlur(g, (0, 0), cell_px / step, borderType=cv2.BORDER_REFLECT)
    ranks = np.argsort(np.argsort(g.ravel())).reshape(g.shape)
    u = (ranks + 0.5) / ranks.size

    def at(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        xi = np.clip(np.asarray(x) / step, 0, gw - 1).astype(int)
        yi = np.clip(np.asarray(y) / step, 0, gh - 1).astype(int)
        return u[yi, xi]

    at.grid = u  # type: ignore[attr-defined]
    at.step = step  # type: ignore[attr-defined]
    return at


class _Grid:
    """Spatial hash of discs for overlap checks."""

    def __init__(self, cell: float) -> None:
        self.cell = cell
        self.items: dict[tuple[int, int], list[tuple[float, float, float]]] = {}

    def near(self, x: float, y: float, reach: float):
        c = self.cell
        for gx in range(int((x - reach) // c), int((x + reach) // c) + 1):
            for gy in range(int((y - reach) // c), int((y + reach) // c) + 1):
                yield from self.items.get((gx, gy), ())

    def add(self, x: float, y: float, r: float) -> None:
        self.items.setdefault((int(x // self.cell), int(y // self.cell)), []).append((x, y, r))

    def clear_of(self, x: float, y: float, r: float, factor: float, reach: float) -> bool:
        return all(np.hypot(x - a, y - b) >= factor * (r + rb) for a, b, rb in self.near(x, y, reach))


class _Pools:
    """Sprites cut from PBC crops on demand, each crop segmented once per build."""

    def __init__(self, params: SlideGenParams, pbc_dir: Path, rows: list[dict[str, str]],
                 rng: np.random.Generator, heldout: set[str] | None) -> None:
        self.p = params
        self.dir = pbc_dir
        self.scale = params.source_um_per_px / params.um_per_px
        self.feather = 1.5
        if heldout is None:
            held = heldout_rows(rows, params.heldout_every, params.split_seed)
        else:
            held = [r for r in rows if str((pbc_dir / r["path"]).resolve()) in heldout
                    or r["label"] == "platelet"]
        self.by_class: dict[str, list[str]] = {}
        self.lobed: set[str] = set()
        for r in held:
            self.by_class.setdefault(r["label"], []).append(r["path"])
            if r["label"] in LOBED:
                self.lobed.add(r["path"])
        missing = [c for c, s in params.class_mix.items() if s > 0 and c not in self.by_class]
        if missing:
            raise SlideGenError(f"slidegen.class_mix: no PBC cells labelled {missing}")
        self._cache: dict[str, Sprite | None] = {}
        self.rbc: list[Sprite] = []
        plasmas = []
        all_paths = sorted(r["path"] for r in rows if r["label"] != "platelet")
        for path in rng.choice(all_paths, size=min(params.background_crops, len(all_paths)),
                               replace=False):
            sprites, plasma = red_cell_sprites(self._read(path), params.source_um_per_px,
                                               self.scale, path)
            self.rbc.extend(sprites)
            plasmas.append(plasma)
        if len(self.rbc) < 4:
            raise SlideGenError("too few red cells found in the background crops")
        self.plasma = np.median(np.array(plasmas), axis=0).astype(np.float32)
        areas = np.array([(s.alpha > 0.5).sum() for s in self.rbc])
        med = np.median(areas)
        self.rbc = [s for s, a in zip(self.rbc, areas) if 0.6 * med <= a <= 1.5 * med]
        self.rbc_radius = float(np.sqrt(med / np.pi))

    def _read(self, rel: str) -> np.ndarray:
        try:
            return read_rgb(self.dir / rel)
        except ImageError as exc:
            raise SlideGenError(str(exc)) from None

    def leukocyte(self, path: str, detached: bool = False) -> Sprite | None:
        """The sprite of one crop's leukocyte (``detached``: with a lobe pushed off)."""
        key = f"{path}|detached" if detached else path
        if key not in self._cache:
            rgb = self._read(path)
            seg = segment_leukocyte(rgb)
            if seg is None or seg[0].sum() < 400:
                self._cache[key] = None
                return None
            cell, nucleus = seg
            if (path not in self.lobed and self.p.second_cell_um > 0
                    and second_nucleus_um(nuclei_in_cell(rgb, cell), self.p.source_um_per_px)
                    >= self.p.second_cell_um):
                self._cache[key] = None  # a neighbour came along: the truth would say one cell
                return None
            if detached:
                got = detach_lobes(rgb, cell, nucleus,
                                   self.p.lobe_shift_um / self.p.source_um_per_px)
                if got is None:
                    self._cache[key] = None
                    return None
                rgb, cell, nucleus = got
            plasma = _plasma_rgb(rgb, cell)
            self._cache[key] = _soft_sprite(rgb, cell, plasma, self.scale, self.feather,
                                            path, nucleus=nucleus)
        return self._cache[key]

    def platelet(self, path: str) -> Sprite | None:
        return self.leukocyte(path)


def _rescaled(s: Sprite, f: float) -> Sprite:
    if abs(f - 1) < 1e-3:
        return s
    h, w = s.alpha.shape
    size = (max(2, round(w * f)), max(2, round(h * f)))
    nuc = None if s.nucleus is None else cv2.resize(
        s.nucleus.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    return Sprite(cv2.resize(s.od, size, interpolation=cv2.INTER_LINEAR),
                  np.clip(cv2.resize(s.alpha, size, interpolation=cv2.INTER_LINEAR), 0, 1),
                  nuc, s.source)


def _debris(s: Sprite, rng: np.random.Generator, size_px: int) -> Sprite | None:
    """A fragment of a real nucleus: a small irregular dark speck."""
    ys, xs = np.nonzero(s.nucleus) if s.nucleus is not None else ((), ())
    if len(xs) == 0:
        return None
    i = rng.integers(len(xs))
    half = size_px // 2
    y0, x0 = max(0, ys[i] - half), max(0, xs[i] - half)
    nuc = s.nucleus[y0:y0 + size_px, x0:x0 + size_px].astype(np.float32)
    h, w = nuc.shape
    if h < 4 or w < 4:
        return None
    yy, xx = np.mgrid[:h, :w]
    a, b = rng.uniform(0.3, 0.5) * w, rng.uniform(0.3, 0.5) * h
    ell = (((xx - w / 2) / a) ** 2 + ((yy - h / 2) / b) ** 2) <= 1
    alpha = cv2.GaussianBlur(nuc * ell, (0, 0), 0.8)
    if alpha.max() < 0.5:
        return None
    return Sprite(s.od[y0:y0 + h, x0:x0 + w].copy(), alpha, None, s.source)


def layout(params: SlideGenParams, seed: int, heldout: set[str] | None = None,
           split_note: str | None = None) -> tuple[list[Placed], dict[str, Any], np.ndarray]:
    """Place every object of the slide. Returns (objects in paint order, truth, plasma RGB).

    ``heldout``: resolved paths the leukocytes may come from (e.g. the classifier's test
    split, :func:`classifier_split_paths`); None uses :func:`heldout_rows`."""
    from daemon.config import REPO_ROOT  # path resolution only

    p = params
    rng = np.random.default_rng(seed)
    pbc_dir = p.pbc_dir if p.pbc_dir.is_absolute() else (REPO_ROOT / p.pbc_dir).resolve()
    pools = _Pools(p, pbc_dir, read_manifest(pbc_dir), rng, heldout)
    W, H = p.width_px, p.height_px
    fw, fh = p.field_px
    field_area = float(fw * fh)
    density = _smooth_field(rng, H, W, cell_px=1.2 * max(fw, fh))
    crowd = _smooth_field(rng, H, W, cell_px=0.8 * max(fw, fh))
    lo, hi = p.leukocytes_per_field

    def wbc_rate(x, y):  # expected leukocytes per field at (x, y)
        u = density(x, y)
        thin = u < p.empty_fraction
        ramp = (u - p.empty_fraction) / max(1e-6, 1 - p.empty_fraction)
        return np.where(thin, lo * 0.3 * u / max(p.empty_fraction, 1e-6), lo + (hi - lo) * ramp)

    # --- leukocytes (Poisson thinning, then touching neighbours) --------------------------
    classes = sorted(p.class_mix)
    shares = np.array([p.class_mix[c] for c in classes], float)
    shares /= shares.sum()
    n_cand = rng.poisson(hi * W * H / field_area)
    cx, cy = rng.uniform(0, W, n_cand), rng.uniform(0, H, n_cand)
    keep = rng.uniform(0, hi, n_cand) < wbc_rate(cx, cy)
    seeds = list(zip(cx[keep], cy[keep]))
    placed: list[Placed] = []
    truth_cells: list[dict[str, Any]] = []
    grid = _Grid(120.0)
    reach = 260.0

    def draw_leukocyte() -> tuple[Sprite, str, bool] | None:
        for _ in range(8):
            cls = classes[rng.choice(len(classes), p=shares)]
            pool = pools.by_class[cls]
            path = pool[rng.integers(len(pool))]
            detached = cls in DETACHABLE and rng.uniform() < p.detached_lobe_fraction
            s = pools.leukocyte(path, detached) if detached else None
            if s is None:
                detached = False
                s = pools.leukocyte(path)
            if s is not None:
                f = float(np.clip(1 + p.size_jitter * rng.standard_normal(), 0.8, 1.2))
                return _rescaled(s.transformed(int(rng.integers(8))), f), cls, detached
        return None

    def put(s: Sprite, cls: str, x: float, y: float, cluster: int | None,
            detached: bool = False) -> bool:
        r = s.radius_px
        if not (r <= x < W - r and r <= y < H - r):
            return False
        factor = 0.82 if cluster is not None else 1.05
        if not grid.clear_of(x, y, r, factor, reach):
            return False
        ox, oy = s.centroid()
        x0, y0 = int(round(x - ox)), int(round(y - oy))
        placed.append(Placed(LEUKOCYTE_LAYER, s, x0, y0))
        grid.add(x, y, r)
        h, w = s.alpha.shape
        truth_cells.append({
            "id": len(truth_cells), "x": round(x0 + ox, 2), "y": round(y0 + oy, 2),
            "r_um": round(r * p.um_per_px, 2), "box": [x0, y0, x0 + w, y0 + h],
            "class": cls, "source": s.source, "cluster": cluster, "detached_lobe": detached,
        })
        return True

    n_clusters = 0
    for x, y in seeds:
        got = draw_leukocyte()
        if got is None or not put(got[0], got[1], x, y, None, got[2]):
            continue
        if rng.uniform() >= p.cluster_probability:
            continue
        anchor = truth_cells[-1]
        truth_cells[-1]["cluster"] = n_clusters
        members = 1
        for _ in range(int(rng.integers(1, 4))):
            nb = draw_leukocyte()
            if nb is None:
                continue
            ang = rng.uniform(0, 2 * np.pi)
            d = (anchor["r_um"] / p.um_per_px + nb[0].radius_px) * rng.uniform(0.88, 1.0)
            members += put(nb[0], nb[1], anchor["x"] + d * np.cos(ang),
                           anchor["y"] + d * np.sin(ang), n_clusters, nb[2])
        if members == 1:
            truth_cells[-1]["cluster"] = None
        else:
            n_clusters += 1

    # --- red cells: cover follows a density field; crowded areas overlap ------------------
    r_rbc = pools.rbc_radius
    clo, chi = p.rbc_coverage
    n_cand = rng.poisson(chi * W * H / (np.pi * r_rbc**2) * 3.0)
    rx, ry = rng.uniform(0, W, n_cand), rng.uniform(0, H, n_cand)
    u = 0.6 * density(rx, ry) + 0.4 * crowd(rx, ry)
    cover = clo + (chi - clo) * u
    keep = rng.uniform(0, chi, n_cand) < cover
    rbc_grid = _Grid(2.5 * r_rbc)
    rbcs: list[Placed] = []
    for x, y, c in zip(rx[keep], ry[keep], cover[keep]):
        if not grid.clear_of(x, y, r_rbc * 0.7, 1.0, reach):
            continue  # leukocytes push red cells aside
        factor = float(np.clip(1.0 - 0.45 * c, 0.45, 0.9))
        if not rbc_grid.clear_of(x, y, r_rbc, factor, 2.2 * r_rbc):
            continue
        s = pools.rbc[rng.integers(len(pools.rbc))].transformed(int(rng.integers(8)))
        s = _rescaled(s, float(np.clip(1 + 0.06 * rng.standard_normal(), 0.85, 1.15)))
        ox, oy = s.centroid()
        rbcs.append(Placed("rbc", s, int(round(x - ox)), int(round(y - oy))))
        rbc_grid.add(x, y, r_rbc)

    # --- platelets and debris -------------------------------------------------------------
    others: list[dict[str, Any]] = []
    small: list[Placed] = []
    plt_pool = [r for r in pools.by_class.get("platelet", [])]
    n_fields = W * H / field_area

    def scatter(kind: str, rate: tuple[float, float], make: Callable[[], Sprite | None]) -> None:
        n = rng.poisson(rng.uniform(*rate) * n_fields)
        for x, y in zip(rng.uniform(0, W, n), rng.uniform(0, H, n)):
            s = make()
            if s is None or not grid.clear_of(x, y, s.radius_px, 1.0, reach):
                continue
            ox, oy = s.centroid()
            x0, y0 = int(round(x - ox)), int(round(y - oy))
            small.append(Placed(kind, s, x0, y0))
            others.append({"kind": kind, "x": round(x0 + ox, 2), "y": round(y0 + oy, 2),
                           "source": s.source})

    def make_platelet() -> Sprite | None:
        if not plt_pool:
            return None
        s = pools.platelet(plt_pool[rng.integers(len(plt_pool))])
        return None if s is None else s.transformed(int(rng.integers(8)))

    def make_debris() -> Sprite | None:
        leuk = [pl.sprite for pl in placed]
        if not leuk:
            return None
        size = int(rng.uniform(1.0, 3.0) / p.um_per_px)
        return _debris(leuk[rng.integers(len(leuk))], rng, size)

    scatter("platelet", p.platelets_per_field, make_platelet)
    scatter("debris", p.debris_per_field, make_debris)

    truth = {
        "version": TRUTH_VERSION,
        "seed": seed,
        "um_per_px": p.um_per_px,
        "width": W,
        "height": H,
        "field_px": list(p.field_px),
        "split": split_note or (f"1 in {p.heldout_every} per label by "
                                f"sha1({p.split_seed}:sha1_original)"),
        "class_mix": {c: p.class_mix[c] for c in classes},
        "cells": truth_cells,
        "others": others,
    }
    return rbcs + small + placed, truth, pools.plasma


def render(objects: list[Placed], params: SlideGenParams, plasma: np.ndarray,
           seed: int) -> np.ndarray:
    """Paint the objects tile by tile in optical density, then apply stain and light drift.

    Red cells, platelets and debris add density (overlaps darken, as in a smear); leukocytes
    are laid over what is beneath with their soft alpha. Returns RGB uint8 (H, W, 3).
    """
    p = params
    rng = np.random.default_rng([seed, 1])
    W, H, T = p.width_px, p.height_px, 1024
    stain = [_smooth_field(rng, H, W, 1.5 * max(p.field_px)) for _ in range(3)]  # common, R, G
    light = _smooth_field(rng, H, W, 2.0 * max(p.field_px))
    noise_rng = np.random.default_rng([seed, 2])
    out = np.empty((H, W, 3), np.uint8)
    x0s = np.array([o.x0 for o in objects])
    y0s = np.array([o.y0 for o in objects])
    x1s = x0s + np.array([o.sprite.alpha.shape[1] for o in objects])
    y1s = y0s + np.array([o.sprite.alpha.shape[0] for o in objects])
    for ty in range(0, H, T):
        for tx in range(0, W, T):
            th, tw = min(T, H - ty), min(T, W - tx)
            od = np.zeros((th, tw, 3), np.float32)
            hit = np.nonzero((x0s < tx + tw) & (x1s > tx) & (y0s < ty + th) & (y1s > ty))[0]
            for i in hit:  # indices keep paint order
                o = objects[i]
                ax0, ay0 = max(o.x0, tx), max(o.y0, ty)
                ax1, ay1 = min(x1s[i], tx + tw), min(y1s[i], ty + th)
                sl = (slice(ay0 - o.y0, ay1 - o.y0), slice(ax0 - o.x0, ax1 - o.x0))
                dst = od[ay0 - ty:ay1 - ty, ax0 - tx:ax1 - tx]
                a = o.sprite.alpha[sl][..., None]
                if o.layer == LEUKOCYTE_LAYER:
                    dst *= 1 - a
                dst += a * o.sprite.od[sl]
            yy, xx = np.mgrid[ty:ty + th, tx:tx + tw]
            # Stain strength drifts as one density factor; a quarter of it per channel (hue),
            # so a region is paler or darker but a cell type keeps its colour.
            common = p.stain_variation * (2 * stain[0](xx, yy) - 1)
            gain = np.stack([1 + common + 0.25 * p.stain_variation * (2 * f(xx, yy) - 1)
                             for f in stain[1:]] + [1 + common], -1)
            lum = 1 + p.illumination_variation * (2 * light(xx, yy) - 1)
            rgb = plasma[None, None, :] * lum[..., None] * np.exp(-od * gain.astype(np.float32))
            if p.noise_sigma > 0:
                rgb += noise_rng.normal(0, p.noise_sigma, rgb.shape).astype(np.float32)
            out[ty:ty + th, tx:tx + tw] = np.clip(rgb + 0.5, 0, 255).astype(np.uint8)
    return out


def build_slide(params: SlideGenParams, seed: int, heldout: set[str] | None = None,
                split_note: str | None = None) -> VirtualSlide:
    """Lay out and paint a virtual slide from ``seed`` (same seed and params, same slide).
    ``heldout`` as in :func:`layout`."""
    objects, truth, plasma = layout(params, seed, heldout, split_note)
    rgb = render(objects, params, plasma, seed)
    return VirtualSlide(rgb, params.um_per_px, truth)


# ----------------------------------------------------------------------------------- write


def write_slide(slide: VirtualSlide, tif_path: str | Path, truth_path: str | Path,
                params: SlideGenParams) -> None:
    """Write a tiled pyramidal TIFF (levels halve down to ~1 tile) and the truth JSON.

    The pixel size is in XResolution/YResolution (pixels per cm, which OpenSlide turns into
    ``openslide.mpp-x``) and in the ImageDescription as JSON ``{"um_per_px": ...}``.
    """
    import tifffile

    tif_path, truth_path = Path(tif_path), Path(truth_path)
    tif_path.parent.mkdir(parents=True, exist_ok=True)
    comp = {"jpeg": "jpeg", "deflate": "zlib", "none": None}[params.compression]
    comp_args = {"level": params.jpeg_quality} if params.compression == "jpeg" else None
    desc = json.dumps({"um_per_px": slide.um_per_px, "generator": "marrowcount make-slide",
                       "seed": slide.truth["seed"]})
    tmp = tif_path.with_name(tif_path.name + ".part")
    level, scale = slide.rgb, 1
    with tifffile.TiffWriter(tmp, bigtiff=level.nbytes > 2**31) as tw:
        while True:
            res = 1e4 / (slide.um_per_px * scale)
            tw.write(level, tile=(params.tile_px, params.tile_px), photometric="rgb",
                     compression=comp, compressionargs=comp_args, resolution=(res, res), resolutionunit="CENTIMETER",
                     description=desc if scale == 1 else None, metadata=None,
                     subfiletype=0 if scale == 1 else 1)
            if max(level.shape[:2]) <= params.tile_px:
                break
            level = cv2.resize(level, (max(1, level.shape[1] // 2), max(1, level.shape[0] // 2)),
                               interpolation=cv2.INTER_AREA)
            scale *= 2
    tmp.replace(tif_path)
    tmp_json = truth_path.with_name(truth_path.name + ".part")
    tmp_json.write_text(json.dumps(slide.truth, indent=1), encoding="utf-8")
    tmp_json.replace(truth_path)


def read_truth(path: str | Path) -> dict[str, Any]:
    """Load and check a ground-truth JSON written by :func:`write_slide`."""
    path = Path(path)
    try:
        truth = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SlideGenError(f"{path}: not a readable truth file ({exc})".splitlines()[0]) from None
    if not isinstance(truth, dict) or truth.get("version") != TRUTH_VERSION or "cells" not in truth:
        raise SlideGenError(f"{path}: not a marrowcount slide truth file (version {TRUTH_VERSION})")
    return truth
