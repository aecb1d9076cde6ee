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


def bccd_smear() -> np.ndarray:
    """A 9×3-field strip of real BCCD fields shaped like a smear: a thick head (two layers of
    cells, optical densities added), a counting monolayer, and a thin feather edge (bare
    glass with a few small patches of cells). Each column is 3 fields (640×480) wide."""
    good = bccd_mosaic(3, 3, start=0).astype(np.float32)
    bg = np.percentile(good.reshape(-1, 3), 99, axis=0)
    head = bccd_mosaic(3, 3, start=9).astype(np.float32) * bccd_mosaic(3, 3, start=18) / bg
    feather = np.broadcast_to(bg, good.shape).copy()
    src = bccd_mosaic(3, 3, start=27)
    for j in range(3):
        for i in range(3):
            y, x = j * 480 + 180, i * 640 + 260
            feather[y:y + 120, x:x + 120] = src[y:y + 120, x:x + 120]
    return np.clip(np.concatenate([head, good, feather], 1), 0, 255).astype(np.uint8)
