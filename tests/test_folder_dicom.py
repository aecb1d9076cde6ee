"""The scanner-folder watcher on DICOM WSI series (tests/dicom_wsi.py, from real BCCD fields):
a folder of instance files is one slide, processed once when every file has settled, and a
broken series is quarantined as a whole folder."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from drivers.slide_image import open_slide, write_pyramid
from drivers.wsi_fields import source_from_plan
from tests.conftest import BCCD_UM_PER_PX
from tests.dicom_wsi import write_dicom_associated, write_dicom_wsi
from tests.slide_fixtures import bccd_mosaic
from tests.test_folder_watch import (  # noqa: F401  (inbox and store are fixtures)
    inbox,
    make_params,
    rows,
    scan_until_idle,
    slides,
    store,
    watch_while_writing,
    watcher,
    write_slowly,
)

WIDTH, HEIGHT = 4 * 640, 3 * 480
FIELD_UM = (640 * BCCD_UM_PER_PX, 480 * BCCD_UM_PER_PX)
WHOLE_SLIDE_UM = ((0.0, 0.0), (WIDTH * BCCD_UM_PER_PX, HEIGHT * BCCD_UM_PER_PX))


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dicom") / "series"
    write_dicom_wsi(folder, bccd_mosaic(4, 3), BCCD_UM_PER_PX)
    return folder


def dicom_params(config, inbox: Path, **over):
    """Watch ``inbox`` with one BCCD field per counting field over the whole slide."""
    wsi = {**config.watch.wsi.model_dump(), "field_um": FIELD_UM}
    folder = {"area_um": WHOLE_SLIDE_UM, **over.pop("folder", {})}
    return make_params(config, inbox, wsi=wsi, folder=folder, **over)


def test_series_written_file_by_file_is_processed_once_after_it_completes(
        config, store, inbox, series):
    events: list = []
    w = watcher(config, store, dicom_params(config, inbox, stable_seconds=2.0), events)
    target = inbox / "BM-DCM-1"
    # The base level last: a series taken before it had fully arrived would be quarantined
    # (no full-resolution level, or a truncated one) rather than queued.
    names = ["level2.dcm", "level1.dcm", "level0.dcm"]

    def scanner() -> None:
        target.mkdir()
        for name in names:
            write_slowly(target / name, (series / name).read_bytes(), chunks=6, pause=0.1)

    assert watch_while_writing(w, events, scanner, timeout=60.0)
    assert [(e.kind, Path(e.path).name) for e in events] == [("slide", "BM-DCM-1")], events
    (slide,) = slides(store)
    (pf,) = slide.plan["files"]
    assert pf["path"] == str(target) and pf["format"] == "dicom"
    assert (pf["width"], pf["height"]) == (WIDTH, HEIGHT)
    assert pf["um_per_px"] == BCCD_UM_PER_PX and slide.um_per_px == BCCD_UM_PER_PX
    assert len(pf["tiles"]) == 12
    (row,) = rows(store)
    assert row.state == "processing" and row.path == str(target)
    assert row.size == sum(f.stat().st_size for f in target.iterdir())

    # The daemon's field source reads the series' fields at the file's pixel size.
    gate_off = config.acquisition.quality.model_copy(update={"enabled": False})
    fields = list(source_from_plan(slide.plan, gate_off, config.detect).fields())
    assert len(fields) == 12 and {f.um_per_px for f in fields} == {BCCD_UM_PER_PX}
    with open_slide(target) as s:
        for f in fields:
            x, y, fw, fh = (int(v) for v in f.tile.rsplit("#", 1)[1].split(","))
            assert f.image is not None and (fw, fh) == (640, 480)
            np.testing.assert_array_equal(f.image, s.read_region(x, y, fw, fh))
            assert f.stage_x == pytest.approx((x + fw / 2) * BCCD_UM_PER_PX)

    # Delivered again under another folder name, and a restart: nothing new.
    shutil.copytree(target, inbox / "BM-DCM-1-again")
    again = watcher(config, store, dicom_params(config, inbox, stable_seconds=0.0))
    assert [(e.kind, Path(e.path).name) for e in scan_until_idle(again)] == [
        ("duplicate", "BM-DCM-1-again")]
    restarted = watcher(config, store, dicom_params(config, inbox, stable_seconds=0.0))
    assert restarted.scan_once() == [] and restarted._hashes == {}
    assert len(slides(store)) == 1 and len(rows(store)) == 1


def test_broken_series_are_quarantined_whole_and_valid_slides_complete(
        config, store, inbox, series):
    for name in ("good", "truncated", "not_dicom", "no_base"):
        shutil.copytree(series, inbox / name)
    data = (series / "level0.dcm").read_bytes()
    (inbox / "truncated" / "level0.dcm").write_bytes(data[: len(data) * 2 // 3])
    (inbox / "not_dicom" / "level1.dcm").write_text("scanner log, not an image\n")
    (inbox / "no_base" / "level0.dcm").unlink()
    write_pyramid(inbox / "good.tif", bccd_mosaic(4, 3, start=20), BCCD_UM_PER_PX)
    evs = scan_until_idle(watcher(config, store, dicom_params(config, inbox, stable_seconds=0.0)))
    quarantined = {Path(e.path).name: e.reason for e in evs if e.kind == "quarantined"}
    assert set(quarantined) == {"truncated", "not_dicom", "no_base"}
    assert "truncated instance" in quarantined["truncated"]
    assert "level1.dcm: not a DICOM file" in quarantined["not_dicom"]
    assert "no full-resolution level" in quarantined["no_base"]
    qdir = inbox / "quarantine"
    for name, reason in quarantined.items():
        assert not (inbox / name).exists()
        assert sorted(p.name for p in (qdir / name).iterdir()) == sorted(
            p.name for p in series.iterdir() if name != "no_base" or p.name != "level0.dcm")
        assert reason in (qdir / f"{name}.error.txt").read_text()
    assert sorted(s.name for s in slides(store)) == ["good", "good.tif"]
    states = sorted(r.state for r in rows(store))
    assert states == ["processing", "processing", "quarantined", "quarantined", "quarantined"]
    assert watcher(config, store, dicom_params(config, inbox, stable_seconds=0.0)).scan_once() == []


def test_series_folders_follow_the_path_rules_and_the_marker(config, store, inbox, series,
                                                              tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(series / "level2.dcm", outside / "level2.dcm")
    linked = inbox / "linked"
    linked.mkdir()
    for name in ("level0.dcm", "level1.dcm"):
        shutil.copy(series / name, linked / name)
    os.symlink(outside / "level2.dcm", linked / "level2.dcm")
    dotted = inbox / "dotted"
    shutil.copytree(series, dotted)
    (dotted / "level1.dcm").rename(dotted / "level..1.dcm")
    shutil.copytree(series, inbox / "marked")
    for name in ("level0.dcm", "level1.dcm"):  # loose in the watch folder: not a series
        shutil.copy(series / name, inbox / name)
    params = dicom_params(config, inbox, stable_seconds=3600.0, folder={"marker": ".done"})
    w = watcher(config, store, params)
    refused = {Path(e.path).name: e.reason for e in w.scan_once() if e.kind == "refused"}
    assert set(refused) == {"linked", "dotted"}
    assert refused["linked"].startswith(
        "refused: level2.dcm: symlink points outside the watch folder")
    assert refused["dotted"] == "refused: level..1.dcm: name contains '..'"
    assert (outside / "level2.dcm").exists()  # the target itself is never touched
    assert w.scan_once() == []  # "marked" waits for its marker
    (inbox / "marked" / ".done").write_text("")
    evs = w.scan_once()
    assert [(e.kind, Path(e.path).name) for e in evs] == [("slide", "marked")]
    assert (inbox / "level0.dcm").exists() and [s.name for s in slides(store)] == ["marked"]


def test_loose_instance_files_of_two_slides_are_grouped_into_a_folder_each(config, store, inbox,
                                                                          series, tmp_path):
    """A DICOM store writing every instance file of every slide into the watch folder itself:
    once all have settled, each slide's files (its pyramid and its label, by study and
    container) move into a folder named after the container and are counted there, once; a
    file that is no whole-slide image is quarantined with the reason."""
    import pydicom

    other = write_dicom_wsi(tmp_path / "other", bccd_mosaic(3, 2), BCCD_UM_PER_PX)
    label = write_dicom_associated(tmp_path / "label.dcm", bccd_mosaic(1, 1)[:256, :512],
                                   "LABEL", 0.02, slide_of=series / "level0.dcm")
    for i, f in enumerate(sorted(series.glob("*.dcm"))):
        shutil.copy(f, inbox / f"A{i}.dcm")
    shutil.copy(label, inbox / "A-label.dcm")
    for i, f in enumerate(other):
        shutil.copy(f, inbox / f"B{i}.dcm")
    report = pydicom.dcmread(series / "level2.dcm")
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # a structured report, not an image
    report.save_as(inbox / "report.dcm")
    (inbox / "late.dcm.part").write_bytes(b"still being written")
    params = dicom_params(config, inbox, stable_seconds=0.0)
    w = watcher(config, store, params)
    assert scan_until_idle(w, passes=4) == []  # a partial file is being written beside them
    (inbox / "late.dcm.part").unlink()
    evs = scan_until_idle(w)
    containers = {str(pydicom.dcmread(p, stop_before_pixels=True).ContainerIdentifier): p.parent
                  for p in (series / "level0.dcm", other[0])}
    grouped = {Path(e.path).name: e.reason for e in evs if e.kind == "grouped"}
    assert set(grouped) == set(containers)
    a = inbox / next(c for c, d in containers.items() if d == series)
    assert sorted(p.name for p in a.iterdir()) == ["A-label.dcm", "A0.dcm", "A1.dcm", "A2.dcm"]
    assert not list(inbox.glob("*.dcm"))
    quarantined = [e for e in evs if e.kind == "quarantined"]
    assert [Path(e.path).name for e in quarantined] == ["report.dcm"]
    assert "not a whole-slide image instance" in quarantined[0].reason
    queued = sorted(Path(e.path).name for e in evs if e.kind == "slide")
    assert queued == sorted(containers)
    done = {s.name: s for s in slides(store)}
    assert set(done) == set(containers)
    with open_slide(a) as s:
        assert (s.width, s.height) == (WIDTH, HEIGHT)
    assert scan_until_idle(w, passes=4) == []  # nothing twice


def test_a_batch_folder_holding_two_slides_is_split_into_one_folder_each(config, store, inbox,
                                                                        series, tmp_path):
    """A scanner's batch export (one folder, every instance file of two slides): each slide
    gets a folder of its own inside it and is counted on its own; a rescan (two pyramids of
    one container) stays one folder and is quarantined with the reason."""
    import pydicom

    other = write_dicom_wsi(tmp_path / "other", bccd_mosaic(3, 2), BCCD_UM_PER_PX)
    batch = inbox / "batch-0412"
    batch.mkdir()
    for f in sorted(series.glob("*.dcm")):
        shutil.copy(f, batch / f"A-{f.name}")
    for f in other:
        shutil.copy(f, batch / f"B-{f.name}")
    rescan = inbox / "rescan"
    shutil.copytree(series, rescan)
    again = write_dicom_wsi(tmp_path / "again", bccd_mosaic(3, 2), BCCD_UM_PER_PX)
    for f in again:
        ds = pydicom.dcmread(f)
        ds.ContainerIdentifier = pydicom.dcmread(series / "level0.dcm").ContainerIdentifier
        ds.StudyInstanceUID = pydicom.dcmread(series / "level0.dcm").StudyInstanceUID
        ds.save_as(rescan / f"again-{f.name}")
    w = watcher(config, store, dicom_params(config, inbox, stable_seconds=0.0))
    evs = scan_until_idle(w)
    grouped = sorted(Path(e.path).relative_to(inbox).parts[0] for e in evs if e.kind == "grouped")
    assert grouped == ["batch-0412", "batch-0412"]
    assert not list(batch.glob("*.dcm"))
    queued = sorted(Path(e.path).parent.name for e in evs if e.kind == "slide")
    assert queued == ["batch-0412", "batch-0412"]
    assert len(slides(store)) == 2
    (bad,) = [e for e in evs if e.kind == "quarantined"]
    assert Path(bad.path).name == "rescan" and "holds 2 DICOM series" in bad.reason
