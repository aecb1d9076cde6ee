"""Detection speed: median ms per field, crops included (targets: 640×480 ≤ 8 ms,
1388×1040 ≤ 25 ms on 2 cores)."""

from __future__ import annotations

import os
import time

import numpy as np

from daemon.config import load_config
from pipeline.detect import detect
from pipeline.imaging import read_rgb, resample
from tests.conftest import BCCD, BCCD_UM_PER_PX

MARROW_UM_PER_PX = 0.13
CROP_UM_PER_PX = 0.2


def mosaic(fields: list[np.ndarray], shape=(1040, 1388)) -> np.ndarray:
    """A 1388×1040 field at 0.13 µm/px tiled from BCCD fields (about 16 fields' cells)."""
    tiles = [resample(f, BCCD_UM_PER_PX, MARROW_UM_PER_PX) for f in fields]
    th, tw = tiles[0].shape[:2]
    rows = -(-shape[0] // th)
    cols = -(-shape[1] // tw)
    grid = np.vstack([np.hstack(tiles[r * cols : (r + 1) * cols]) for r in range(rows)])
    return np.ascontiguousarray(grid[: shape[0], : shape[1]])


def timed(rgb: np.ndarray, um_per_px: float, params, repeat: int = 3) -> tuple[float, int]:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        cells = detect(rgb, um_per_px, params, CROP_UM_PER_PX)
        best = min(best, time.perf_counter() - t0)
    return best * 1000.0, len(cells)


def main() -> None:
    params = load_config().detect
    paths = sorted((BCCD / "JPEGImages").glob("*.jpg"))
    fields = [read_rgb(p) for p in paths[::4]]  # 91 fields
    detect(fields[0], BCCD_UM_PER_PX, params, CROP_UM_PER_PX)  # warm up (imports, FFT plans)

    small = [timed(f, BCCD_UM_PER_PX, params) for f in fields]
    ms = np.array([s[0] for s in small])
    print(f"   cores available: {len(os.sched_getaffinity(0))}")
    print(
        f"   640x480 at {BCCD_UM_PER_PX} µm/px: median {np.median(ms):.2f} ms, "
        f"p90 {np.percentile(ms, 90):.2f} ms per field over {len(fields)} BCCD fields "
        f"({sum(s[1] for s in small)} cells)  [target <= 8 ms]"
    )

    n_tiles = 16
    big = [mosaic(fields[i : i + n_tiles]) for i in range(0, len(fields) - n_tiles, 4)]
    large = [timed(m, MARROW_UM_PER_PX, params) for m in big]
    ms = np.array([s[0] for s in large])
    cells = np.array([s[1] for s in large])
    print(
        f"   1388x1040 at {MARROW_UM_PER_PX} µm/px: median {np.median(ms):.2f} ms, "
        f"p90 {np.percentile(ms, 90):.2f} ms per field over {len(big)} mosaics of 16 BCCD fields "
        f"(median {np.median(cells):.0f} cells, 96x96 crops at {CROP_UM_PER_PX} µm/px included)  "
        "[target <= 25 ms]"
    )


if __name__ == "__main__":
    main()
