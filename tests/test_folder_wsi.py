"""Whole-slide images as fields: counting area (automatic and given), plan, FieldSource."""

from __future__ import annotations

import json

import numpy as np
import pytest

from drivers.acquisition import FieldSource
from drivers.slide_image import open_slide, write_pyramid
from drivers.wsi_fields import SlideFields, SlidePlan, plan_file, source_from_plan
from pipeline.errors import ImageError
from tests.conftest import BCCD_UM_PER_PX, WSI
from tests.slide_fixtures import bccd_mosaic, bccd_smear

BCCD_FIELD_UM = (640 * BCCD_UM_PER_PX, 480 * BCCD_UM_PER_PX)


@pytest.fixture(scope="module")
def smear_path(tmp_path_factory):
    return write_pyramid(tmp_path_factory.mktemp("smear") / "smear.tif", bccd_smear(),
                         BCCD_UM_PER_PX)


@pytest.fixture
def wsi(config):
    # One BCCD field per counting field; peripheral blood has ~1 leukocyte per such field.
    return config.watch.wsi.model_copy(update={"field_um": BCCD_FIELD_UM, "min_nucleated": 1})


def columns(tiles) -> set[int]:
    return {t[0] // 640 for t in tiles}


def test_automatic_area_leaves_out_thick_head_and_thin_edge(config, wsi, smear_path):
    pf = plan_file(smear_path, "h", None, wsi, config.detect)
    assert pf.area["mode"] == "automatic" and pf.area["grid"] == 27
    assert columns(pf.tiles) == {3, 4, 5}, pf.area
    assert pf.area["left_out"]["thick"] == 9 and pf.area["left_out"]["thin"] == 9
    assert pf.um_per_px == pytest.approx(BCCD_UM_PER_PX)


def test_given_area_in_um(config, wsi, smear_path):
    x0, x1 = 6 * 640 * BCCD_UM_PER_PX, 9 * 640 * BCCD_UM_PER_PX
    area = ((x0, 0.0), (x1, 480 * BCCD_UM_PER_PX))
    pf = plan_file(smear_path, "h", None, wsi, config.detect, area)
    assert pf.area["mode"] == "given"
    assert sorted(pf.tiles) == [(6 * 640, 0, 640, 480), (7 * 640, 0, 640, 480), (8 * 640, 0, 640, 480)]


def test_field_source_order_resume_and_quality_gate(config, wsi, smear_path):
    pf = plan_file(smear_path, "h", None, wsi, config.detect)
    plan = SlidePlan((pf, pf))  # two files: indices run on through the second
    stored = json.loads(json.dumps(plan.as_dict()))
    assert SlidePlan.from_dict(stored) == plan
    open_gate = config.acquisition.quality.model_copy(update={"enabled": False})
    src = source_from_plan(stored, open_gate, config.detect)
    assert isinstance(src, FieldSource)
    fields = list(src.fields())
    assert [f.index for f in fields] == list(range(18))
    with open_slide(smear_path) as s:
        for f, (x, y, w, h) in zip(fields, pf.tiles * 2):
            assert f.tile == f"{smear_path}#{x},{y},{w},{h}" and f.skipped_reason is None
            np.testing.assert_array_equal(f.image, s.read_region(x, y, w, h))
            assert f.stage_x == pytest.approx((x + w / 2) * BCCD_UM_PER_PX)
    resumed = list(src.fields(start_index=7))
    assert [(f.index, f.tile) for f in resumed] == [(f.index, f.tile) for f in fields[7:]]
    # The configured gate (10 nucleated cells per field) skips thin blood fields, with reasons.
    gated = list(SlideFields(plan, config.acquisition.quality, config.detect).fields(16))
    assert [f.index for f in gated] == [16, 17]
    assert all(f.skipped_reason.startswith("thin") for f in gated)
    # A skipped field keeps its image for the pixel-size check (the service does not store it).
    for f, (x, y, w, h) in zip(gated, (pf.tiles * 2)[16:]):
        np.testing.assert_array_equal(f.image, fields[f.index].image)


def test_single_field_and_coarse_scan(config, tmp_path):
    wsi = config.watch.wsi
    img = bccd_mosaic(2, 2)
    small = write_pyramid(tmp_path / "one.tif", img, 0.072)
    pf = plan_file(small, "h", None, wsi, config.detect)
    assert pf.tiles == ((0, 0, 1280, 960),) and pf.area == {"mode": "single field"}
    coarse = write_pyramid(tmp_path / "coarse.tif", img, 1.0)
    with pytest.raises(ImageError, match="coarser than"):
        plan_file(coarse, "h", None, wsi, config.detect)


def test_real_ndpi_plan_stays_inside_the_slide(config):
    ndpi = WSI / "test3-DAPI-2.ndpi"
    # A fluorescence (DAPI) scan: no area looks like a stained smear's monolayer. It was
    # queued with 0 fields and reached review as 0 of N cells; now it is refused with why.
    with pytest.raises(ImageError, match=r"no area of the slide looks countable \(40 "
                       r"field-sized areas: 40 thick\)"):
        plan_file(ndpi, "h", None, config.watch.wsi, config.detect)
    # With the area given (slide µm, 3968×4864 px at 0.228), its fields lie inside the slide.
    pf = plan_file(ndpi, "h", None, config.watch.wsi, config.detect,
                   ((0.0, 0.0), (900.0, 1100.0)))
    assert pf.format == "hamamatsu" and pf.um_per_px == pytest.approx(0.22817, rel=1e-3)
    fw, fh = pf.area["field_px"]
    assert pf.area["grid"] == (pf.width // fw) * (pf.height // fh) and pf.tiles
    for x, y, w, h in pf.tiles:
        assert 0 <= x and x + w <= pf.width and 0 <= y and y + h <= pf.height
