"""The field-quality gate on real cells: thin, normal, dense and out-of-focus fields."""

from __future__ import annotations

import csv

import cv2
import numpy as np
import pytest

from pipeline.imaging import read_rgb
from pipeline.quality import assess_field
from tests.acquire_fixtures import acquisition_params, detect_params
from tests.conftest import BCCD_UM_PER_PX, PBC, PBC_UM_PER_PX
from tests.slide_fixtures import bccd_field


def _pbc_paths(labels: tuple[str, ...], n: int) -> list:
    with open(PBC / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] in labels]
    return [PBC / r["path"] for r in rows[:: max(1, len(rows) // n)][:n]]


def _tiles(paths: list, cols: int, size: int) -> np.ndarray:
    """Real PBC crops cut to ``size`` px around their centred leukocyte and tiled."""
    crops = []
    for p in paths:
        rgb = read_rgb(p)
        h, w = rgb.shape[:2]
        y0, x0 = (h - size) // 2, (w - size) // 2
        crops.append(rgb[y0 : y0 + size, x0 : x0 + size])
    rows = [np.concatenate(crops[i : i + cols], 1) for i in range(0, len(crops), cols)]
    return np.ascontiguousarray(np.concatenate(rows, 0))


@pytest.fixture(scope="module")
def marrow_field() -> np.ndarray:
    # 16 leukocytes of mixed classes, 4 x 4 crops of 25 µm: a countable marrow-like field.
    labels = ("segmented_neutrophil", "lymphocyte", "erythroblast", "myelocyte", "monocyte")
    return _tiles(_pbc_paths(labels, 16), 4, 250)


def test_a_countable_field_passes_and_its_cells_are_counted(marrow_field):
    params = acquisition_params().quality
    q = assess_field(marrow_field, PBC_UM_PER_PX, params, detect_params())
    assert q.reason is None, q
    assert 12 <= q.nucleated <= 22  # 16 leukocytes, give or take lobes and stray platelets


def test_blood_diluted_field_is_thin():
    rgb = read_rgb(bccd_field(3))  # peripheral blood: one or two leukocytes per field
    q = assess_field(rgb, BCCD_UM_PER_PX, acquisition_params().quality, detect_params())
    assert q.reason is not None and q.reason.startswith("thin")
    assert 0 < q.nucleated < 10


def test_packed_nuclei_are_a_particle_centre():
    # Crops cut to the nucleus (10 µm) and packed edge to edge: nuclei everywhere.
    dense = _tiles(_pbc_paths(("lymphocyte", "erythroblast"), 48), 8, 100)
    q = assess_field(dense, PBC_UM_PER_PX, acquisition_params().quality, detect_params())
    assert q.reason is not None and q.reason.split(":")[0] in {"dense", "clumped"}, q
    assert q.nuclear_fraction > 0.3


def test_blurred_field_is_out_of_focus(marrow_field):
    params = acquisition_params().quality
    sharp = assess_field(marrow_field, PBC_UM_PER_PX, params, detect_params())
    # 1 µm Gaussian blur: what the virtual microscope shows about 2 µm off focus
    blurred = cv2.GaussianBlur(marrow_field, (0, 0), 1.0 / PBC_UM_PER_PX)
    q = assess_field(blurred, PBC_UM_PER_PX, params, detect_params())
    assert q.reason is not None and q.reason.startswith("out of focus"), q
    assert q.sharpness < sharp.sharpness / 4


def test_disabled_gate_measures_but_never_skips():
    rgb = read_rgb(bccd_field(3))
    q = assess_field(rgb, BCCD_UM_PER_PX, acquisition_params(quality={"enabled": False}).quality,
                     detect_params())
    assert q.reason is None and q.nucleated < 10 and q.as_dict()["nucleated"] == q.nucleated
