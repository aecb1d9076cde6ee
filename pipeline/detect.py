"""Leukocyte detection: saliency, clustering, watershed splitting and lobe merging.

The seed's detector, worked at a fixed physical scale so one parameter set serves any camera:

1. resample the field to about ``work_um_per_px`` (a whole-number shrink factor);
2. HSV conversion and contrast enhancement into a *nucleus map*: saturation above the
   field's background, weighted by closeness to the purple hue of stained chromatin
   (RBCs are pink-red, background is unsaturated);
3. spectral-residual saliency of that map at a small size (the seed's candidate finder);
4. threshold: a pixel is nucleus when it is salient enough *and* its enhanced saturation
   passes an absolute floor (so a field with no leukocyte yields nothing);
5. merge fragments of one nucleus (the lobes of band and segmented neutrophils) by closing
   gaps up to ``merge_gap_um``; the resulting clusters are single cells or, by area in µm²,
   multi-cell clusters;
6. split multi-cell clusters with a distance-transform watershed, keeping only cuts across a
   neck and never cutting a lobe-sized fragment;
7. drop platelets and debris (nucleus area below ``min_nucleus_um2``) and cells whose
   nucleus touches the border; cut a fixed 96×96 crop around each centre.

All sizes in ``DetectParams`` are in µm or µm²; pixels only exist inside this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import cv2
import numpy as np
from pydantic import Field

from pipeline.errors import ImageError
from pipeline.imaging import CROP_SIZE, as_rgb, check_scale, crop_at, resample
from pipeline.params import Params


class DetectParams(Params):
    """Detector settings; defaults live in the ``detect:`` section of config/default.yaml."""

    work_um_per_px: float = Field(gt=0, le=2.0)
    """Scale the field is analysed at (µm per pixel). Where a whole-number shrink factor gets
    within 15% of it, that factor is used (exact, fast area averaging)."""
    saliency_px: int = Field(ge=32, le=512)
    """Longer side of the map the spectral residual is computed on."""
    saliency_blur_um: float = Field(ge=0)
    """Gaussian sigma smoothing the saliency map."""
    saliency_factor: float = Field(gt=0)
    """A pixel is salient when its saliency exceeds this multiple of the field's mean."""
    hue_deg: tuple[float, float]
    """Hue range (degrees, 0–360) of stained nuclei; weight falls off linearly outside it."""
    hue_soft_deg: float = Field(ge=0)
    """Width of the linear fall-off around ``hue_deg``."""
    min_saturation: float = Field(ge=0, le=255)
    """Nucleus floor: weighted saturation above the field's background (0–255)."""
    merge_gap_um: float = Field(ge=0)
    """Fragments closer than this belong to one nucleus (lobes of one neutrophil)."""
    min_nucleus_um2: float = Field(gt=0)
    """Smaller nuclei are platelets or stain debris."""
    single_max_um2: float = Field(gt=0)
    """A cluster with more nucleus area than this is split as a multi-cell cluster."""
    uncut_nucleus_max_um2: float = Field(gt=0)
    """A split never cuts through one connected nucleus up to this area (a monocyte's folded
    nucleus); it only shares out separate nuclei that gap closing had joined."""
    separate_nucleus_min_um2: float = Field(ge=0)
    """Gap closing never joins two nuclei each at least this large whose centres are
    ``separate_nucleus_um`` apart: they are two touching cells (an erythroblast beside a
    neighbour), not two lobes. 0 = off."""
    separate_nucleus_um: float = Field(gt=0)
    split_min_radius_um: float = Field(gt=0)
    """Smallest half-width of a nucleus that a watershed split may create."""
    split_max_neck: float = Field(gt=0)
    """A watershed cut longer than this fraction of the smaller piece's diameter is no neck
    between two cells: the pieces stay one cell."""
    exclude_border: bool
    """Leave out cells cut by the field edge (the seed's rule; a tiled scan sees them whole)."""
    border_um: float = Field(ge=0)
    """With ``exclude_border``: a nucleus closer than this to the edge counts as cut."""
    box_margin_um: float = Field(ge=0)
    """Reported box: the nucleus box grown by this margin (cytoplasm), clipped to the field."""


@dataclass(frozen=True)
class Detection:
    """One leukocyte.

    ``x, y``: centre in input pixels; ``box``: ``(x0, y0, x1, y1)`` input pixels, exclusive end;
    ``area_um2``: nucleus area; ``crop``: uint8 ``(96, 96, 3)`` RGB at the caller's crop scale.
    """

    x: float
    y: float
    box: tuple[int, int, int, int]
    area_um2: float
    crop: np.ndarray


@dataclass(frozen=True)
class _Cell:
    """A cell found at the working scale (pixels of the working image)."""

    x: float
    y: float
    box: tuple[int, int, int, int]
    area_px: int


def spectral_residual(gray: np.ndarray, size: int) -> np.ndarray:
    """Spectral-residual saliency (Hou & Zhang 2007) of a 2-D map.

    The map is shrunk so its longer side is ``size`` pixels; returns float32 saliency of that
    shrunken shape, scaled to mean 1 (all zeros for a flat map).
    """
    h, w = gray.shape
    f = size / max(h, w)
    small = cv2.resize(
        gray.astype(np.float32), (max(8, round(w * f)), max(8, round(h * f))),
        interpolation=cv2.INTER_AREA,
    )
    spec = np.fft.rfft2(small)
    amp = np.abs(spec)
    log_amp = np.log(amp + 1e-6)
    residual = log_amp - cv2.blur(log_amp.astype(np.float32), (3, 3))
    phase = spec / (amp + 1e-6)
    sal = np.abs(np.fft.irfft2(np.exp(residual) * phase, s=small.shape)) ** 2
    sal = sal.astype(np.float32)
    mean = float(sal.mean())
    return sal / mean if mean > 0 else sal


def nucleus_map(rgb: np.ndarray, params: DetectParams) -> np.ndarray:
    """Enhanced nucleus evidence, uint8 ``(H, W)``: saturation above the field's background
    level, weighted by hue closeness to ``params.hue_deg``. 0 for background and RBCs."""
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)  # hue 0–255 for the full circle
    hue, sat = hsv[:, :, 0], hsv[:, :, 1]
    # Contrast enhancement: subtract the background (median) saturation of this field, so a
    # pale or a heavily stained slide gives the same nucleus contrast.
    hist = np.bincount(sat[::2, ::2].ravel(), minlength=256).cumsum()
    background = int(np.searchsorted(hist, hist[-1] / 2.0))
    lifted = cv2.subtract(sat, background)
    return cv2.multiply(lifted, _hue_weight(params.hue_deg, params.hue_soft_deg)[hue], scale=1 / 255)


@lru_cache(maxsize=8)
def _hue_weight(hue_deg: tuple[float, float], soft_deg: float) -> np.ndarray:
    """uint8 (256,) weight (255 = purple) for each full-circle OpenCV hue value."""
    hue = np.arange(256, dtype=np.float64) * (360.0 / 256.0)
    lo, hi = hue_deg
    centre, half = (lo + hi) / 2.0, (hi - lo) / 2.0
    dist = np.abs((hue - centre + 180.0) % 360.0 - 180.0)  # circular distance to the centre
    if soft_deg > 0:
        weight = np.clip(1.0 - (dist - half) / soft_deg, 0.0, 1.0)
    else:
        weight = (dist <= half).astype(np.float64)
    return np.round(weight * 255).astype(np.uint8)


def _disk(radius_px: float) -> np.ndarray:
    r = max(1, int(round(radius_px)))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def _split(
    mask: np.ndarray, nucleus: np.ndarray, min_radius_px: float, max_px: float, max_neck: float
) -> list[np.ndarray]:
    """Split one multi-cell cluster with a distance-transform watershed.

    ``mask``: the cluster after gap closing (bool, cropped); ``nucleus``: its nucleus pixels.
    A cut is kept only across a neck: two pieces whose shared boundary is longer than
    ``max_neck`` times the smaller piece's diameter are one cell (a large round promyelocyte
    is not two cells). Nucleus fragments no larger than ``max_px`` (a lobe, a whole nucleus)
    are never cut: each goes whole to the piece holding most of it, so the lobes of one
    neutrophil stay together. Returns one bool nucleus mask per cell.
    """
    from skimage.segmentation import watershed  # small window: speed is not an issue here

    dist = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5)
    peaks = (dist >= cv2.dilate(dist, _disk(min_radius_px))) & (dist >= min_radius_px)
    n, markers = cv2.connectedComponents(peaks.astype(np.uint8))
    if n <= 2:
        return [nucleus]
    regions = watershed(-dist, markers, mask=mask)
    regions = _merge_wide_cuts(regions, n, max_neck)
    nf, frags, fstats, _ = cv2.connectedComponentsWithStats(nucleus.astype(np.uint8), connectivity=8)
    owner = regions.copy()
    for j in range(1, nf):
        if fstats[j, 4] <= max_px:
            sel = frags == j
            owner[sel] = np.bincount(regions[sel], minlength=n).argmax()
    cells = [(owner == i) & nucleus for i in range(1, n)]
    return [c for c in cells if c.any()]


def _merge_wide_cuts(regions: np.ndarray, n: int, max_neck: float) -> np.ndarray:
    """Relabel watershed pieces 1..n-1 so that pieces sharing a boundary longer than
    ``max_neck`` × the smaller one's equivalent diameter become one."""
    # Boundary length from the counts of horizontal and vertical neighbour pairs across the
    # cut: sqrt(h² + v²) is exact for a straight cut of any direction.
    steps = []
    for a, b in ((regions[:, :-1], regions[:, 1:]), (regions[:-1, :], regions[1:, :])):
        count = np.zeros((n, n), np.float64)
        cut = (a != b) & (a > 0) & (b > 0)
        np.add.at(count, (a[cut], b[cut]), 1)
        steps.append(count + count.T)
    shared = np.hypot(steps[0], steps[1])
    diameter = 2.0 * np.sqrt(np.bincount(regions.ravel(), minlength=n) / np.pi)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for i in range(1, n):
        for j in range(i + 1, n):
            if shared[i, j] > max_neck * min(diameter[i], diameter[j]):
                parent[root(j)] = root(i)
    lut = np.array([root(i) for i in range(n)], dtype=regions.dtype)
    return lut[regions]


def _separate(nucleus: np.ndarray, min_px: float, apart_px: float) -> list[np.ndarray]:
    """One merged nucleus mask, or one mask per large fragment when two or more fragments of
    at least ``min_px`` lie ``apart_px`` or more apart (small fragments join the nearest)."""
    if min_px <= 0:
        return [nucleus]
    n, lab, stats, cen = cv2.connectedComponentsWithStats(nucleus.astype(np.uint8), connectivity=8)
    big = [j for j in range(1, n) if stats[j, cv2.CC_STAT_AREA] >= min_px]
    if len(big) < 2:
        return [nucleus]
    c = cen[big]
    d = np.hypot(*(c[:, None, :] - c[None, :, :]).transpose(2, 0, 1))
    if d[np.triu_indices(len(big), 1)].min() < apart_px:
        return [nucleus]
    nearest = {j: big[int(np.argmin(np.hypot(*(c - cen[j]).T)))] for j in range(1, n)}
    return [np.isin(lab, [j for j in range(1, n) if nearest[j] == b]) for b in big]


def find_cells(rgb: np.ndarray, px: float, params: DetectParams) -> list[_Cell]:
    """Detect leukocytes in an RGB image at ``px`` µm/px (about ``params.work_um_per_px``)."""
    h, w = rgb.shape[:2]
    evidence = nucleus_map(rgb, params)

    sal = spectral_residual(evidence, params.saliency_px)
    f = sal.shape[1] / w
    if params.saliency_blur_um > 0:
        sal = cv2.GaussianBlur(sal, (0, 0), params.saliency_blur_um * f / px)
    salient = (sal > params.saliency_factor * float(sal.mean() or 1.0)).astype(np.uint8)
    salient = cv2.resize(salient, (w, h), interpolation=cv2.INTER_NEAREST)
    nucleus = (evidence > params.min_saturation) & (salient > 0)
    nucleus = cv2.morphologyEx(nucleus.astype(np.uint8), cv2.MORPH_OPEN, _disk(0.5 / px)) > 0

    # Merge lobes: close gaps up to merge_gap_um, then group by the closed mask.
    closed = cv2.morphologyEx(
        nucleus.astype(np.uint8), cv2.MORPH_CLOSE, _disk(params.merge_gap_um / (2 * px))
    )
    n, labels, stats, _ = cv2.connectedComponentsWithStats(closed, connectivity=8)
    area_px = np.bincount(labels[nucleus], minlength=n)
    px2 = px * px
    min_px = params.min_nucleus_um2 / px2
    single_px = params.single_max_um2 / px2
    border = params.border_um / px

    cells: list[_Cell] = []
    for i in range(1, n):
        if area_px[i] < min_px:
            continue
        x0, y0, bw, bh = (int(v) for v in stats[i, :4])
        sub_lab = labels[y0 : y0 + bh, x0 : x0 + bw] == i
        sub_nuc = nucleus[y0 : y0 + bh, x0 : x0 + bw] & sub_lab
        parts = (
            _split(sub_lab, sub_nuc, params.split_min_radius_um / px,
                   params.uncut_nucleus_max_um2 / px2, params.split_max_neck)
            if area_px[i] > single_px
            else _separate(sub_nuc, params.separate_nucleus_min_um2 / px2,
                           params.separate_nucleus_um / px)
        )
        for part in parts:
            ys, xs = np.nonzero(part)
            if len(xs) < min_px:
                continue
            bx0, by0 = int(xs.min()) + x0, int(ys.min()) + y0
            bx1, by1 = int(xs.max()) + x0 + 1, int(ys.max()) + y0 + 1
            if params.exclude_border and (
                bx0 <= border or by0 <= border or bx1 >= w - border or by1 >= h - border
            ):
                continue
            cells.append(
                _Cell(float(xs.mean()) + x0, float(ys.mean()) + y0, (bx0, by0, bx1, by1), len(xs))
            )
    return cells


def check_field_scale(um_per_px: float, params: DetectParams, name: str = "um_per_px") -> float:
    """``um_per_px`` as float, if a field at that pixel size can be searched for leukocytes:
    no coarser than twice the detector's working scale (ImageError otherwise)."""
    value = check_scale(um_per_px, name)
    if value > 2 * params.work_um_per_px:
        raise ImageError(
            f"{name} {value:g}: a field at {value:g} µm/px is too coarse to detect leukocytes "
            f"in (detection works at {params.work_um_per_px:g} µm/px and needs at most "
            f"{2 * params.work_um_per_px:g}; counting needs a 40–100× objective, ~0.05–0.3 "
            "µm/px): check the stated pixel size")
    return value


def detect(
    rgb: np.ndarray, um_per_px: float, params: DetectParams, crop_um_per_px: float
) -> list[Detection]:
    """Find the leukocytes in one field.

    ``rgb``: uint8 ``(H, W, 3)`` at ``um_per_px``. Returns detections ordered top to bottom,
    left to right, each with a 96×96 crop cut from ``rgb`` at ``crop_um_per_px``. Raises
    ImageError for a grayscale image, a bad scale, a field too coarse to resolve a nucleus
    (over twice ``params.work_um_per_px``), or a field smaller than one crop.
    """
    rgb = as_rgb(rgb)
    um_per_px = check_field_scale(um_per_px, params)
    crop_um_per_px = check_scale(crop_um_per_px, "crop_um_per_px")
    h, w = rgb.shape[:2]
    crop_um = CROP_SIZE * crop_um_per_px
    if min(h, w) < CROP_SIZE or w * um_per_px < crop_um or h * um_per_px < crop_um:
        raise ImageError(
            f"image of {w}×{h} px at {um_per_px:g} µm/px is smaller than one "
            f"{crop_um:.1f} µm crop"
        )
    # Shrink by an integer factor near the working scale: area averaging is then exact and
    # about 3x faster. The last k-1 rows/columns are left out (they are border anyway).
    k = max(1, round(params.work_um_per_px / um_per_px))
    if k > 1 and abs(k * um_per_px / params.work_um_per_px - 1.0) <= 0.15:
        work_um = um_per_px * k
        work = resample(rgb[: h - h % k, : w - w % k], um_per_px, work_um)
        sx = sy = float(k)
    else:
        work_um = params.work_um_per_px
        work = resample(rgb, um_per_px, work_um)
        sx, sy = w / work.shape[1], h / work.shape[0]
    margin = params.box_margin_um / um_per_px
    out = []
    for c in find_cells(work, work_um, params):
        x, y = (c.x + 0.5) * sx - 0.5, (c.y + 0.5) * sy - 0.5
        box = (
            max(0, int(c.box[0] * sx - margin)),
            max(0, int(c.box[1] * sy - margin)),
            min(w, int(np.ceil(c.box[2] * sx + margin))),
            min(h, int(np.ceil(c.box[3] * sy + margin))),
        )
        area = c.area_px * work_um**2
        out.append(Detection(x, y, box, area, crop_at(rgb, um_per_px, (x, y), crop_um_per_px)))
    out.sort(key=lambda d: (d.y, d.x))
    return out
