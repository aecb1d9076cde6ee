"""Pixel-size check from red cells on real images of three sources."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.calibrate import check_pixel_size, estimate_pixel_size, rbc_diameters
from pipeline.imaging import read_rgb, resample
from tests.conftest import BCCD, BCCD_UM_PER_PX, PBC, PBC_UM_PER_PX, ZHENG
from tests.slide_fixtures import bccd_mosaic

ZHENG2_UM_PER_PX = 0.11  # measured from red cells by the data set's curator (README)


def every(paths: list[Path], n: int) -> list[np.ndarray]:
    """n images spread evenly over a sorted list (deterministic, all classes for PBC)."""
    paths = sorted(paths)
    step = max(1, len(paths) // n)
    return [read_rgb(p) for p in paths[::step][:n]]


@pytest.mark.parametrize(
    "name, images, stated",
    [
        ("bccd", lambda: every(list((BCCD / "JPEGImages").glob("*.jpg")), 60), BCCD_UM_PER_PX),
        ("pbc", lambda: every(list(PBC.rglob("*.jpg")), 150), PBC_UM_PER_PX),
        ("zheng2", lambda: every(list((ZHENG / "Dataset 2").glob("*.png")), 100), ZHENG2_UM_PER_PX),
    ],
)
def test_estimate_within_ten_percent(config, name, images, stated):
    est = estimate_pixel_size(images(), config.calibrate)
    assert est.n_cells >= 10, name
    assert abs(est.um_per_px - stated) / stated < 0.10, (name, est)


def test_estimate_follows_the_scale(config):
    # The same fields shrunk to 0.12 µm/px give an estimate that moves with them.
    fields = every(list((BCCD / "JPEGImages").glob("*.jpg")), 40)
    base = estimate_pixel_size(fields, config.calibrate).um_per_px
    small = [resample(f, BCCD_UM_PER_PX, 0.12) for f in fields]
    shrunk = estimate_pixel_size(small, config.calibrate).um_per_px
    assert abs(shrunk / base - 0.12 / BCCD_UM_PER_PX) < 0.1 * 0.12 / BCCD_UM_PER_PX


def test_check_pixel_size_flags_a_wrong_scale(config):
    # Three BCCD fields side by side with 18 whole, isolated red cells (most hold 0-2).
    rgb = bccd_mosaic(3, 1, 250)
    diam = rbc_diameters(rgb, config.calibrate)
    assert len(diam) >= config.calibrate.min_cells
    est, off = check_pixel_size(rgb, BCCD_UM_PER_PX, config.calibrate)
    assert est is not None and not off
    est2, off2 = check_pixel_size(rgb, 2 * BCCD_UM_PER_PX, config.calibrate)
    assert est2 == est and off2
    # A field without isolated red cells gives no estimate and never a warning.
    blank = np.full((480, 640, 3), 230, np.uint8)
    assert check_pixel_size(blank, 0.1, config.calibrate) == (None, False)
    # Nor do a few red-cell-like fragments: the first BCCD fields hold 3 (~20 px, where a red
    # cell is ~100 px), which once read as 0.37 µm/px, "80% off" the true 0.072.
    few = [read_rgb(p) for p in sorted((BCCD / "JPEGImages").glob("*.jpg"))[:3]]
    est = estimate_pixel_size(few, config.calibrate)
    assert 0 < est.n_cells < config.calibrate.min_cells and est.um_per_px is None


def test_calibrate_cli(capsys, monkeypatch):
    from daemon.cli import main

    files = sorted((BCCD / "JPEGImages").glob("*.jpg"))[::12]
    monkeypatch.setattr(sys, "argv", ["marrowcount", "calibrate", *map(str, files), "--um-per-px", "0.2", "--json"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["images"] == len(files)
    assert abs(out["um_per_px"] - BCCD_UM_PER_PX) / BCCD_UM_PER_PX < 0.1
    assert out["disagrees"] is True  # 0.2 is far from the estimate
