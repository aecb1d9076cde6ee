"""Optional Reinhard stain normalisation toward a training reference.

Reinhard et al. (2001): match each channel's mean and standard deviation in CIE L*a*b* to
a reference. The reference statistics are computed from the training crops and stored in the
checkpoint, so training and inference normalise the same way. An image whose statistics
equal the reference is returned unchanged (up to 8-bit rounding of the colour conversion).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass(frozen=True)
class StainReference:
    """Per-channel mean and std of L*a*b* (OpenCV 8-bit scale), each a length-3 tuple."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def lab_stats(rgb: np.ndarray) -> StainReference:
    """Reference statistics of one RGB uint8 image ``(H, W, 3)`` or a batch ``(N, H, W, 3)``."""
    lab = cv2.cvtColor(np.ascontiguousarray(rgb.reshape(-1, 1, 3)), cv2.COLOR_RGB2LAB)
    lab = lab.reshape(-1, 3).astype(np.float64)
    # Plain floats: the reference is stored in checkpoints, which load weights-only.
    return StainReference(tuple(float(v) for v in lab.mean(0)),
                          tuple(float(v) for v in np.maximum(lab.std(0), 1e-6)))


def reinhard(rgb: np.ndarray, ref: StainReference) -> np.ndarray:
    """Normalise one RGB uint8 image ``(H, W, 3)`` toward ``ref``; returns RGB uint8."""
    own = lab_stats(rgb)
    if np.allclose(own.mean, ref.mean, atol=0.5) and np.allclose(own.std, ref.std, atol=0.5):
        return rgb.copy()  # already at the reference: skip the lossy 8-bit Lab round trip
    lab = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2LAB).astype(np.float32)
    scale = np.asarray(ref.std, np.float32) / np.asarray(own.std, np.float32)
    out = (lab - np.asarray(own.mean, np.float32)) * scale + np.asarray(ref.mean, np.float32)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    return cv2.cvtColor(out, cv2.COLOR_LAB2RGB)
