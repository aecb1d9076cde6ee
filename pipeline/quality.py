"""A cheap field-quality gate: is a field worth counting, and if not, why.

Area selection changes a marrow differential, so every skipped field keeps its reason. The
gate looks at nuclei found with the detector's own nucleus map (``pipeline.detect``) at a
coarse scale, which costs a few milliseconds per field:

- *thin*: fewer than ``min_nucleated`` nucleated cells in the field: the smear is diluted
  with blood there (or the field is empty glass);
- *dense*: nuclear stain covers more than ``max_nuclear_fraction`` of the field: the centre
  of a marrow particle, where cells overlap and cannot be told apart;
- *clumped*: most nuclear area lies in blobs larger than any single cell;
- *out of focus*: sharpness (variance of the Laplacian of luminance) below ``min_sharpness``;
- *dark*: mean brightness below ``min_brightness``: no light reached the camera (lamp,
  shutter, exposure), judged first. ``drivers.acquisition.count_slide`` stops a slide whose
  fields are dark or out of focus ``fault_after_fields`` times in a row: a hardware fault,
  not a thin smear.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from pydantic import Field

from pipeline.detect import DetectParams, nucleus_map
from pipeline.imaging import as_rgb, check_scale, resample
from pipeline.params import Params


class QualityParams(Params):
    """The ``acquisition.quality:`` config section."""

    enabled: bool
    work_um_per_px: float = Field(gt=0, description="scale the gate looks at")
    nucleus_min_area_um2: float = Field(gt=0, description="smaller blobs are platelets/debris")
    min_nucleated: int = Field(ge=0, description="fewer per field suggests blood dilution")
    max_nuclear_fraction: float = Field(gt=0, le=1, description="denser: particle centre")
    max_cell_area_um2: float = Field(gt=0, description="a nuclear blob larger is a clump")
    max_clumped_fraction: float = Field(gt=0, le=1)
    min_sharpness: float = Field(ge=0, description="variance of Laplacian at sharpness scale")
    sharpness_um_per_px: float = Field(gt=0, description="scale sharpness is measured at")
    min_brightness: float = Field(ge=0, le=255, description="mean brightness (0-255) below "
                                  "which a field is dark: no light reached the camera")
    fault_after_fields: int = Field(ge=1, description="fields dark or out of focus in a row "
                                    "that stop a slide as a hardware fault")


#: How the reasons a failing lamp, shutter, exposure or focus drive gives begin.
HARDWARE_REASONS = ("dark:", "out of focus:")


@dataclass(frozen=True)
class FieldQuality:
    """The gate's verdict: ``reason`` is None for a field to count, else why it is skipped."""

    reason: str | None
    nucleated: int
    nuclear_fraction: float
    clumped_fraction: float
    sharpness: float
    brightness: float = 255.0

    def as_dict(self) -> dict[str, float | int | str | None]:
        return {
            "reason": self.reason,
            "brightness": round(self.brightness, 1),
            "nucleated": self.nucleated,
            "nuclear_fraction": round(self.nuclear_fraction, 4),
            "clumped_fraction": round(self.clumped_fraction, 4),
            "sharpness": round(self.sharpness, 3),
        }


def sharpness(rgb: np.ndarray, um_per_px: float, at_um_per_px: float) -> float:
    """Variance of the Laplacian of luminance, measured at ``at_um_per_px``.

    Measuring at a fixed physical scale makes values comparable across cameras; the field is
    only ever shrunk (never enlarged) to reach that scale.
    """
    rgb = as_rgb(rgb)
    scale = max(check_scale(um_per_px), at_um_per_px)
    small = resample(rgb, um_per_px, scale)
    luma = cv2.cvtColor(small, cv2.COLOR_RGB2GRAY)
    return float(cv2.Laplacian(luma, cv2.CV_32F, ksize=3).var())


def assess_field(
    rgb: np.ndarray, um_per_px: float, params: QualityParams, detect_params: DetectParams
) -> FieldQuality:
    """Judge one RGB uint8 ``(H, W, 3)`` field at ``um_per_px``; see the module doc."""
    rgb = as_rgb(rgb)
    um_per_px = check_scale(um_per_px)
    sharp = sharpness(rgb, um_per_px, params.sharpness_um_per_px)
    work = max(um_per_px, params.work_um_per_px)
    small = resample(rgb, um_per_px, work)
    bright = float(small.mean())
    mask = (nucleus_map(small, detect_params) >= detect_params.min_saturation).astype(np.uint8)
    # Lobes of one neutrophil are fragments of one nucleus: close the gaps before counting.
    gap_px = max(1, int(round(detect_params.merge_gap_um / work)))
    mask = cv2.morphologyEx(
        mask, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (gap_px, gap_px))
    )
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    px_um2 = work * work
    areas = stats[1:, cv2.CC_STAT_AREA].astype(np.float64) * px_um2
    nuclei = areas[areas >= params.nucleus_min_area_um2]
    total = float(nuclei.sum())
    fraction = total / (mask.size * px_um2)
    clumped = float(nuclei[nuclei > params.max_cell_area_um2].sum()) / total if total else 0.0
    # A clump holds several cells: count it as at least its area's worth for the thin test.
    nucleated = int(np.ceil(nuclei / params.max_cell_area_um2).sum())
    reason = None
    if params.enabled:
        if bright < params.min_brightness:
            reason = (f"dark: mean brightness {bright:.0f} < {params.min_brightness:g} "
                      "(lamp, shutter or camera exposure)")
        elif nucleated < params.min_nucleated:
            reason = f"thin: {nucleated} nucleated cells < {params.min_nucleated} (blood dilution)"
        elif fraction > params.max_nuclear_fraction:
            reason = (
                f"dense: nuclear stain covers {fraction:.0%} > "
                f"{params.max_nuclear_fraction:.0%} (particle centre)"
            )
        elif clumped > params.max_clumped_fraction:
            reason = f"clumped: {clumped:.0%} of nuclear area in clumps"
        elif sharp < params.min_sharpness:
            reason = f"out of focus: sharpness {sharp:.1f} < {params.min_sharpness:g}"
    return FieldQuality(reason, nucleated, fraction, clumped, sharp, bright)
