"""DICOM whole-slide image series (written from real BCCD fields by tests/dicom_wsi.py) read
through OpenSlide directly and through drivers/slide_image.py, by folder and by one file."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest

from drivers.slide_image import OpenSlideImage, open_slide
from pipeline.errors import ImageError
from tests.conftest import BCCD_UM_PER_PX
from tests.dicom_wsi import write_dicom_associated, write_dicom_wsi
from tests.slide_fixtures import bccd_mosaic

LEVELS = [(2560, 1440), (1280, 720), (640, 360)]


@pytest.fixture(scope="module")
def mosaic() -> np.ndarray:
    return bccd_mosaic(4, 3)


@pytest.fixture(scope="module")
def series(tmp_path_factory, mosaic) -> Path:
    folder = tmp_path_factory.mktemp("dicom") / "BM-DCM"
    write_dicom_wsi(folder, mosaic, BCCD_UM_PER_PX)
    return folder


def broken_copy(series: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / name
    shutil.copytree(series, copy)
    return copy


@pytest.mark.parametrize("jpeg", [True, False], ids=["jpeg-baseline", "uncompressed"])
def test_openslide_reads_the_written_series(tmp_path, mosaic, jpeg):
    files = write_dicom_wsi(tmp_path / "s", mosaic, BCCD_UM_PER_PX, jpeg=jpeg)
    assert [f.name for f in files] == ["level0.dcm", "level1.dcm", "level2.dcm"]
    assert openslide.OpenSlide.detect_format(str(files[2])) == "dicom"
    with openslide.OpenSlide(str(files[2])) as s:  # any instance opens the whole series
        assert list(s.level_dimensions) == LEVELS
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(BCCD_UM_PER_PX)
        assert s.properties["dicom.ImageType[0]"] == "ORIGINAL"
        region = np.asarray(s.read_region((700, 300), 0, (900, 700)))[:, :, :3]
        half = np.asarray(s.read_region((0, 0), 1, LEVELS[1]))[:, :, :3]
    want = mosaic[300:1000, 700:1600]
    want_half = cv2.resize(mosaic, LEVELS[1], interpolation=cv2.INTER_AREA)
    if jpeg:
        assert np.abs(region.astype(int) - want).mean() < 2.0
        assert np.abs(half.astype(int) - want_half).mean() < 3.0
    else:
        np.testing.assert_array_equal(region, want)
        np.testing.assert_array_equal(half, want_half)


def test_open_slide_on_the_folder_and_on_one_file_agree(series):
    with open_slide(series) as by_folder, open_slide(series / "level1.dcm") as by_file:
        for s in (by_folder, by_file):
            assert isinstance(s, OpenSlideImage) and s.format == "dicom"
            assert [lvl[:2] for lvl in s.levels] == LEVELS
            assert s.um_per_px == BCCD_UM_PER_PX and s.um_per_px_source == "OpenSlide dicom mpp-x"
        assert by_folder.path == series and by_file.path == series / "level1.dcm"
        np.testing.assert_array_equal(by_folder.read_region(600, 300, 1388, 1040),
                                      by_file.read_region(600, 300, 1388, 1040))


def test_broken_series_folders_get_one_line_reasons(series, tmp_path):
    truncated = broken_copy(series, tmp_path, "truncated")
    data = (series / "level0.dcm").read_bytes()
    (truncated / "level0.dcm").write_bytes(data[: len(data) * 2 // 3])
    cut_header = broken_copy(series, tmp_path, "cut_header")
    (cut_header / "level1.dcm").write_bytes((series / "level1.dcm").read_bytes()[:400])
    not_dicom = broken_copy(series, tmp_path, "not_dicom")
    (not_dicom / "level2.dcm").write_text("scanner log, not an image\n")
    no_base = broken_copy(series, tmp_path, "no_base")
    (no_base / "level0.dcm").unlink()
    two = broken_copy(series, tmp_path, "two_series")
    write_dicom_wsi(tmp_path / "other", bccd_mosaic(2, 2, start=12), BCCD_UM_PER_PX)
    shutil.copy(tmp_path / "other" / "level0.dcm", two / "other.dcm")
    empty = tmp_path / "empty"
    empty.mkdir()
    expected = {
        truncated: "level 0 (2560x1440) cannot be read to its last frame (a truncated instance",
        cut_header: "level1.dcm: DICOM, but not a whole-slide image instance",
        not_dicom: "level2.dcm: not a DICOM file",
        no_base: "no full-resolution level (its largest level is RESAMPLED)",
        two: "holds 2 DICOM series of pyramid images",
        empty: "a folder with no .dcm series in it",
    }
    for folder, reason in expected.items():
        with pytest.raises(ImageError) as err:
            open_slide(folder)
        assert str(err.value).startswith(f"{folder.name}: ") and reason in str(err.value)
        assert "\n" not in str(err.value)
    # One instance file opened on its own: libdicom's reason, naming the file.
    (empty / "level2.dcm").write_bytes((series / "level2.dcm").read_bytes()[:400])
    with pytest.raises(ImageError, match=r"^level2\.dcm: cannot open dicom slide: libdicom IO"):
        open_slide(empty / "level2.dcm")


def test_label_and_overview_series_beside_the_pyramid_are_left_aside(series, mosaic, tmp_path):
    """Scanners write the label and the overview photograph as series of their own in the
    slide's folder: the slide is the pyramid series; a folder of only those, or with a DICOM
    object that is no whole-slide image at all, is refused with its reason."""
    import pydicom

    folder = broken_copy(series, tmp_path, "with_label")
    overview = cv2.resize(mosaic, (640, 360), interpolation=cv2.INTER_AREA)
    write_dicom_associated(folder / "overview.dcm", overview, "OVERVIEW", BCCD_UM_PER_PX * 4)
    write_dicom_associated(folder / "label.dcm", mosaic[:256, :512], "LABEL", 0.02)
    with open_slide(folder) as s, open_slide(series) as plain:
        assert (s.width, s.height) == (plain.width, plain.height) == LEVELS[0]
        assert s.um_per_px == pytest.approx(BCCD_UM_PER_PX, rel=1e-3)
        assert np.array_equal(s.read_region(300, 200, 640, 480),
                              plain.read_region(300, 200, 640, 480))

    only = tmp_path / "only_label"
    write_dicom_associated(only / "label.dcm", mosaic[:256, :512], "LABEL", 0.02)
    write_dicom_associated(only / "overview.dcm", overview, "OVERVIEW", BCCD_UM_PER_PX * 4)
    with pytest.raises(ImageError, match=r"^only_label: none of its 2 DICOM files is a pyramid"):
        open_slide(only)

    foreign = broken_copy(series, tmp_path, "with_report")
    ds = pydicom.dcmread(series / "level2.dcm")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    ds.save_as(foreign / "report.dcm")
    with pytest.raises(ImageError, match=r"^with_report: report\.dcm: DICOM, but not a whole-"):
        open_slide(foreign)
