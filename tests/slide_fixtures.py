"""Small real inputs for the slide-reader and folder-watcher tests, built from shared BCCD fields."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.imaging import read_rgb
from tests.conftest import BCCD

BCCD_FIELDS = BCCD / "JPEGImages"


def bccd_field(i: int) -> Path:
    """Path of the i-th real BCCD field (640×480 JPEG, ≈0.072 µm/px)."""
    return sorted(BCCD_FIELDS.glob("*.jpg"))[i]


def bccd_mosaic(cols: int, rows: int, start: int = 0) -> np.ndarray:
    """Real BCCD fields tiled side by side: RGB uint8 (480·rows, 640·cols, 3)."""
    paths = sorted(BCCD_FIELDS.glob("*.jpg"))[start:start + cols * rows]
    fields = [read_rgb(p) for p in paths]
    return np.concatenate(
        [np.concatenate(fields[r * cols:(r + 1) * cols], axis=1) for r in range(rows)], axis=0)
