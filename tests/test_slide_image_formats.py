"""drivers/slide_image.py on the real WSI fixtures, real BCCD fields and pyramids written from them."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tifffile

from drivers.slide_image import OpenSlideImage, RasterImage, TiffImage, open_slide, write_pyramid
from pipeline.errors import ImageError
from tests.conftest import BCCD_UM_PER_PX, WSI
from tests.slide_fixtures import bccd_field, bccd_mosaic


@pytest.fixture(scope="module")
def mosaic() -> np.ndarray:
    return bccd_mosaic(4, 3)


def test_aperio_svs_metadata_and_region():
    with open_slide(WSI / "CMU-1-Small-Region.svs") as s:
        assert isinstance(s, OpenSlideImage) and s.format == "aperio"
        assert (s.width, s.height) == (2220, 2967)
        assert s.um_per_px == pytest.approx(0.499)
        region = s.read_region(1000, 1000, 300, 200)
        assert region.shape == (200, 300, 3) and region.dtype == np.uint8
        # H&E tissue in the middle of the slide: not blank glass.
        assert region.std() > 10


def test_ndpi_pyramid_and_overview():
    with open_slide(WSI / "test3-DAPI-2.ndpi") as s:
        assert s.format == "hamamatsu"
        assert s.um_per_px == pytest.approx(0.22817, rel=1e-3)
        assert len(s.levels) > 3 and s.levels[0][:2] == (s.width, s.height)
        overview, ds = s.read_overview(400)
        assert max(overview.shape[:2]) <= 400
        assert ds == pytest.approx(s.width / overview.shape[1])


def test_generic_tiff_without_pixel_size():
    # boxes.tiff carries only a 72 dpi display default, which is no microscope scale.
    with open_slide(WSI / "boxes.tiff") as s:
        assert isinstance(s, TiffImage)
        assert len(s.levels) == 4
        assert s.um_per_px is None


def test_region_outside_is_white_and_matches_pixels(tmp_path, mosaic):
    path = write_pyramid(tmp_path / "v.tif", mosaic, BCCD_UM_PER_PX, compression="zlib")
    with open_slide(path) as s:
        assert isinstance(s, TiffImage)
        assert (s.width, s.height) == (mosaic.shape[1], mosaic.shape[0])
        assert s.um_per_px == pytest.approx(BCCD_UM_PER_PX)
        assert s.um_per_px_source == "TIFF resolution tags"
        assert len(s.levels) >= 3
        inside = s.read_region(700, 300, 1388, 1040)
        np.testing.assert_array_equal(inside, mosaic[300:1340, 700:2088])
        edge = s.read_region(-100, s.height - 50, 300, 200)
        assert (edge[:, :100] == 255).all() and (edge[50:] == 255).all()
        np.testing.assert_array_equal(edge[:50, 100:], mosaic[-50:, :200])
        overview, ds = s.read_overview(640)
        assert overview.shape[1] == 640 and ds == pytest.approx(s.width / 640)


def test_ome_physical_size(tmp_path, mosaic):
    path = write_pyramid(tmp_path / "v.ome.tif", mosaic, 0.25, ome=True)
    with open_slide(path) as s:
        assert s.format == "ome-tiff"
        assert s.um_per_px == pytest.approx(0.25) and s.um_per_px_source == "OME PhysicalSizeX"
        got = s.read_region(0, 0, 640, 480).astype(int)
        assert np.abs(got - mosaic[:480, :640]).mean() < 3  # JPEG tiles


def test_inch_resolution_tag(tmp_path, mosaic):
    path = tmp_path / "field.tif"
    dpi = 25400 / 0.1
    tifffile.imwrite(path, mosaic[:480, :640], photometric="rgb", resolution=(dpi, dpi),
                     resolutionunit="INCH")
    with open_slide(path) as s:
        assert s.um_per_px == pytest.approx(0.1)
        np.testing.assert_array_equal(s.read_region(0, 0, 640, 480), mosaic[:480, :640])


def test_jpeg_field():
    with open_slide(bccd_field(0)) as s:
        assert isinstance(s, RasterImage) and (s.width, s.height) == (640, 480)
        assert s.read_region(600, 0, 100, 10)[:, 40:].min() == 255


@pytest.mark.parametrize("name,reason", [
    ("unopenable.tiff", "52479"),
    ("unreadable.svs", "cannot decode"),
])
def test_broken_fixtures_are_refused_with_reason(name, reason):
    with pytest.raises(ImageError, match=reason):
        open_slide(WSI / name)


@pytest.mark.parametrize("name", ["CMU-1-Small-Region.svs", "small.svs"])
def test_a_scanner_file_cut_short_is_refused_as_truncated(tmp_path, name):
    """A real SVS cut at 77% and at 99% (still being copied): OpenSlide or tifffile opened
    the pages before the cut, and the partial slide was counted, then counted again whole."""
    from tests.conftest import WSI

    whole = (WSI / name).read_bytes()
    for frac in (0.77, 0.99):
        cut = tmp_path / f"cut-{frac}.svs"
        cut.write_bytes(whole[: int(len(whole) * frac)])
        with pytest.raises(ImageError, match="truncated"):
            open_slide(cut)
    ok = tmp_path / "whole.svs"
    ok.write_bytes(whole)
    open_slide(ok).close()


def test_broken_files_refused(tmp_path, mosaic):
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="empty file"):
        open_slide(empty)

    good = write_pyramid(tmp_path / "good.tif", mosaic, BCCD_UM_PER_PX, compression="zlib")
    cut = tmp_path / "cut.tif"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageError, match="truncated|not a readable TIFF"):
        open_slide(cut)

    jpeg_as_svs = tmp_path / "slide.svs"
    shutil.copy(bccd_field(1), jpeg_as_svs)
    with pytest.raises(ImageError, match="extension says TIFF but the content is JPEG"):
        open_slide(jpeg_as_svs)

    short_jpeg = tmp_path / "short.jpg"
    short_jpeg.write_bytes(bccd_field(2).read_bytes()[:5000])
    with pytest.raises(ImageError, match="truncated JPEG"):
        open_slide(short_jpeg)

    text = tmp_path / "notes.tif"
    text.write_text("scanner log, not an image\n")
    with pytest.raises(ImageError, match="not a slide or image"):
        open_slide(text)

    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, mosaic[:100, :100, 0])
    with pytest.raises(ImageError, match="not an RGB colour image"):
        open_slide(gray)
