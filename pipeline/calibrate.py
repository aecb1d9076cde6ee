"""Pixel-size check: estimate µm/px from the median diameter of isolated red cells.

A wrong pixel size is the most common silent error when a new scanner or camera is connected:
every size in µm (detection areas, crop scale) is then wrong. Normal red cells are about
7.5 µm across on a smear, so the median diameter of whole, isolated, round red cells in a
field gives its scale without any metadata.

The measurement is scale-free (no size in µm is known yet): red cells are segmented as the
foreground that differs in colour from the background, holes (central pallor) are filled,
and a component counts as an isolated red cell when it is round and convex, does not touch
the field edge, and holds no purple-stained nucleus.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
from pydantic import Field

from pipeline.imaging import as_rgb, check_scale
from pipeline.params import Params


class CalibrateParams(Params):
    """Settings of the red-cell pixel-size check (``calibrate:`` in config/default.yaml)."""

    rbc_diameter_um: float = Field(gt=0)
    """Diameter of a normal red cell on a smear."""
    max_side_px: int = Field(ge=128)
    """Larger images are shrunk to this longer side before measuring (scale corrected)."""
    threshold_factor: float = Field(gt=0, le=2)
    """Foreground: colour difference from the background above this multiple of Otsu's level."""
    min_diameter_px: float = Field(gt=0)
    """Components smaller than this (in measured pixels) are noise or platelets."""
    min_solidity: float = Field(gt=0, le=1)
    """Area over convex-hull area: touching cells form non-convex clumps."""
    min_roundness: float = Field(gt=0, le=1)
    """Minor over major axis of the fitted ellipse."""
    max_nucleus_fraction: float = Field(ge=0, le=1)
    """Components with more purple nucleus than this fraction are leukocytes."""
    min_cells: int = Field(ge=1)
    """Fewer isolated red cells than this give no estimate."""
    check_fields: int = Field(ge=0)
    """Incoming fields of each slide whose red cells are measured for the pixel-size check
    (the daemon; 0 = no check)."""
    tolerance: float = Field(gt=0, lt=1)
    """A stated pixel size further than this fraction from the estimate disagrees."""


@dataclass(frozen=True)
class PixelSizeEstimate:
    """``um_per_px`` estimated from ``n_cells`` isolated red cells of median ``diameter_px``
    (pixels of the input image); ``um_per_px`` is None when too few cells were found."""

    um_per_px: float | None
    diameter_px: float | None
    n_cells: int


def rbc_diameters(rgb: np.ndarray, params: CalibrateParams) -> np.ndarray:
    """Equivalent diameters (input pixels, float64) of the isolated red cells in one image."""
    rgb = as_rgb(rgb)
    h, w = rgb.shape[:2]
    f = min(1.0, params.max_side_px / max(h, w))
    if f < 1.0:
        rgb = cv2.resize(rgb, (max(1, round(w * f)), max(1, round(h * f))),
                         interpolation=cv2.INTER_AREA)
    lab = cv2.cvtColor(rgb, cv2.COLOR_RGB2LAB)
    # Background: the median colour of the brightest third of the field (glass is brightest);
    # statistics from every third pixel are as good and much cheaper.
    sample = lab[::3, ::3].reshape(-1, 3)
    bright = sample[:, 0] >= np.percentile(sample[:, 0], 67)
    bg = np.median(sample[bright], axis=0).astype(np.float32)
    delta = lab.astype(np.float32) - bg
    diff8 = cv2.convertScaleAbs(np.sqrt(np.einsum("ijk,ijk->ij", delta, delta)), alpha=4.0)
    diff8 = cv2.GaussianBlur(diff8, (0, 0), 1.0)
    # Otsu over the field without stained nuclei (they would pull the threshold above the
    # faint red-cell rims), then lowered so the rims join into closed rings.
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV_FULL)
    hue, sat = hsv[:, :, 0], hsv[:, :, 1]
    sat_floor = min(255, int(np.median(sat[::3, ::3])) + 40)
    purple = (hue > 142) & (hue < 213) & (sat > sat_floor)  # 200-300° of the hue circle
    otsu, _ = cv2.threshold(diff8[~purple].reshape(1, -1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    fg = (diff8 > params.threshold_factor * otsu).astype(np.uint8) * 255
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    fg = _fill_holes(fg)

    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    purple_count = np.bincount(labels[purple], minlength=n)
    sh, sw = fg.shape
    out = []
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        d = np.sqrt(4.0 * area / np.pi)
        if d < params.min_diameter_px or x == 0 or y == 0 or x + bw >= sw or y + bh >= sh:
            continue
        if purple_count[i] > params.max_nucleus_fraction * area:
            continue
        comp = (labels[y : y + bh, x : x + bw] == i).astype(np.uint8)
        contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cnt = max(contours, key=cv2.contourArea)
        hull = cv2.contourArea(cv2.convexHull(cnt))
        if hull <= 0 or area / hull < params.min_solidity or len(cnt) < 5:
            continue
        (_, _), (a1, a2), _ = cv2.fitEllipse(cnt)
        if min(a1, a2) / max(a1, a2) < params.min_roundness:
            continue
        out.append(d / f)
    return np.asarray(out, dtype=np.float64)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill background regions not connected to the image edge (red-cell central pallor)."""
    padded = np.pad(mask, 1)
    flood = padded.copy()
    ff = np.zeros((flood.shape[0] + 2, flood.shape[1] + 2), np.uint8)
    cv2.floodFill(flood, ff, (0, 0), 255)
    holes = cv2.bitwise_not(flood)[1:-1, 1:-1]
    return mask | holes


def robust_diameter(diam: np.ndarray, min_cells: int) -> tuple[float | None, int]:
    """Median red-cell diameter (the units of ``diam``) and how many cells it rests on;
    None when fewer than ``min_cells`` remain."""
    diam = np.asarray(diam, np.float64)
    if len(diam) < min_cells:
        return None, len(diam)
    # Area-weighted median first: small round fragments (rim pieces, platelets) are many but
    # small, whole red cells dominate by area. Then the plain median of cells near it.
    order = np.argsort(diam)
    weight = np.cumsum(diam[order] ** 2)
    med = float(diam[order][np.searchsorted(weight, weight[-1] / 2.0)])
    kept = diam[(diam > 0.8 * med) & (diam < 1.25 * med)]
    if len(kept) < min_cells:
        return None, len(kept)
    return float(np.median(kept)), len(kept)


def estimate_pixel_size(
    images: Sequence[np.ndarray], params: CalibrateParams
) -> PixelSizeEstimate:
    """Estimate µm/px from the pooled isolated red cells of images taken at one scale."""
    diam = np.concatenate([rbc_diameters(im, params) for im in images] or [np.zeros(0)])
    med, n = robust_diameter(diam, params.min_cells)
    return PixelSizeEstimate(None if med is None else params.rbc_diameter_um / med, med, n)


def check_stated_scale(diameters_um: Sequence[float], stated_um_per_px: float,
                       params: CalibrateParams) -> tuple[PixelSizeEstimate, bool]:
    """The check on incoming fields: red-cell diameters pooled over fields, each measured in
    µm *through the stated pixel size*, against a normal red cell.

    Returns the estimate for a field at ``stated_um_per_px`` (``um_per_px`` None when too few
    cells) and whether the stated value is further than ``params.tolerance`` from it.
    """
    stated = check_scale(stated_um_per_px, "stated_um_per_px")
    med, n = robust_diameter(np.asarray(diameters_um, np.float64), params.min_cells)
    if med is None:
        return PixelSizeEstimate(None, None, n), False
    est = stated * params.rbc_diameter_um / med
    return PixelSizeEstimate(est, med / stated, n), disagrees(stated, est, params.tolerance)


def check_pixel_size(
    rgb: np.ndarray, stated_um_per_px: float, params: CalibrateParams
) -> tuple[float | None, bool]:
    """Compare a stated pixel size with the red-cell estimate of one field.

    Returns ``(estimate, disagrees)``: the estimated µm/px (None when the field has too few
    isolated red cells, in which case it never disagrees) and whether the stated value is
    further than ``params.tolerance`` (relative) from it.
    """
    est = estimate_pixel_size([rgb], params).um_per_px
    return est, disagrees(stated_um_per_px, est, params.tolerance)


def disagrees(stated_um_per_px: float, estimate: float | None, tolerance: float) -> bool:
    """Whether a stated pixel size is more than ``tolerance`` (relative) off an estimate;
    never when there is no estimate."""
    stated = check_scale(stated_um_per_px, "stated_um_per_px")
    return estimate is not None and abs(stated - estimate) / estimate > tolerance
