"""The scanner-folder watcher on real files: stability, grouping, idempotence, quarantine, safety.

Slides are real: the WSI fixtures in ../shared/data/wsi and pyramidal TIFFs written from real
BCCD fields. Counting is not run here (see test_folder_count.py): these tests check what the
watcher queues and records in a real store.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import tifffile
from sqlalchemy import select

from daemon.models import ScannedFile, Slide
from daemon.store import Store
from drivers.folder import FolderWatcher, WatchParams, folder_away
from drivers.slide_image import write_pyramid
from tests.conftest import BCCD_UM_PER_PX, WSI
from tests.slide_fixtures import bccd_field, bccd_mosaic


def make_params(config, path: Path, **over) -> WatchParams:
    entry = {"path": str(path), "um_per_px": BCCD_UM_PER_PX}
    entry.update(over.pop("folder", {}))
    data = {**config.watch.model_dump(), "folders": [entry], "stable_seconds": 0.4,
            "scan_seconds": 0.1, **over}
    return WatchParams(**data)


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "data")
    yield s
    s.close()


@pytest.fixture
def inbox(tmp_path) -> Path:
    d = tmp_path / "scanner"
    d.mkdir()
    return d


def watcher(config, store, params, events=None, submitted=None) -> FolderWatcher:
    return FolderWatcher(
        params, store, submit=(submitted.append if submitted is not None else None),
        target=config.acquisition.target, taxonomy=config.taxonomy, detect=config.detect,
        on_event=(events.append if events is not None else None))


def scan_until_idle(w: FolderWatcher, passes: int = 40, pause: float = 0.1) -> list:
    """Run passes until two quiet ones in a row after something happened (or passes run out)."""
    out, quiet = [], 0
    for _ in range(passes):
        got = w.scan_once()
        out += got
        quiet = 0 if got else quiet + 1
        if out and quiet >= 3:
            break
        time.sleep(pause)
    return out


def write_slowly(target: Path, data: bytes, chunks: int = 12, pause: float = 0.1) -> None:
    """Write ``data`` to ``target`` in ``chunks`` pieces, ``pause`` s apart, as a scanner does."""
    step = len(data) // chunks + 1
    with open(target, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i:i + step])
            fh.flush()
            time.sleep(pause)


def watch_while_writing(w: FolderWatcher, events: list, write: Callable[[], None],
                        timeout: float = 30.0) -> bool:
    """Run ``w`` while ``write()`` delivers a slide in another thread, until ``w`` queues a slide,
    then a little longer (more passes, in which nothing further may happen). Returns whether
    ``write`` had finished by the time the slide was queued."""
    done: list[bool] = []

    def deliver() -> None:
        write()
        done.append(True)

    writer = threading.Thread(target=deliver)
    w.start()
    try:
        writer.start()
        deadline = time.monotonic() + timeout
        while not any(e.kind == "slide" for e in events) and time.monotonic() < deadline:
            time.sleep(0.05)
        finished_first = bool(done)
        time.sleep(1.5)
    finally:
        writer.join()
        w.stop()
    return finished_first


def rows(store) -> list[ScannedFile]:
    with store.session() as s:
        return list(s.scalars(select(ScannedFile).order_by(ScannedFile.id)))


def slides(store) -> list[Slide]:
    return store.slides()


@pytest.fixture(scope="module")
def pyramid_bytes(tmp_path_factory) -> bytes:
    p = tmp_path_factory.mktemp("pyr") / "slide.tif"
    write_pyramid(p, bccd_mosaic(4, 4), BCCD_UM_PER_PX, compression="jpeg")
    return p.read_bytes()


def test_slow_copy_is_processed_once_after_it_completes(config, store, inbox, pyramid_bytes):
    params = make_params(config, inbox, stable_seconds=2.0)
    events: list = []
    w = watcher(config, store, params, events)
    target = inbox / "slow.tif"
    assert watch_while_writing(w, events, lambda: write_slowly(target, pyramid_bytes))
    assert [e.kind for e in events] == ["slide"], events
    (slide,) = slides(store)
    plan_file = slide.plan["files"][0]
    assert (plan_file["width"], plan_file["height"]) == (4 * 640, 4 * 480)
    assert plan_file["um_per_px"] == pytest.approx(BCCD_UM_PER_PX)
    (row,) = rows(store)
    assert row.state == "processing" and row.slide_id == slide.id and row.size == len(pyramid_bytes)

    # A restart, and the same slide delivered again under another name: nothing new.
    shutil.copy(target, inbox / "again.tif")
    again = watcher(config, store, make_params(config, inbox, stable_seconds=0.0))
    evs = scan_until_idle(again)
    assert [e.kind for e in evs] == ["duplicate"]
    assert len(slides(store)) == 1 and len(rows(store)) == 1


def test_completion_marker(config, store, inbox, pyramid_bytes):
    params = make_params(config, inbox, stable_seconds=3600.0, folder={"marker": ".done"})
    w = watcher(config, store, params)
    (inbox / "m.tif").write_bytes(pyramid_bytes)
    assert w.scan_once() == [] and w.scan_once() == []
    (inbox / "m.tif.done").write_text("")
    evs = w.scan_once()
    assert [e.kind for e in evs] == ["slide"]


def test_completion_marker_for_a_folder_of_fields(config, store, inbox):
    params = make_params(config, inbox, stable_seconds=3600.0,
                         folder={"marker": ".done", "grouping": "subfolder"})
    w = watcher(config, store, params)
    (inbox / "s1").mkdir()
    for i in range(2):
        shutil.copy(bccd_field(i), inbox / "s1" / f"f{i}.jpg")
    assert w.scan_once() == []
    shutil.copy(bccd_field(2), inbox / "s1" / "f2.jpg")  # the scanner is still at it
    assert w.scan_once() == []
    (inbox / "s1.done").write_text("")
    (ev,) = w.scan_once()
    assert ev.kind == "slide" and len(store.slide(ev.slide_id).plan["files"]) == 3


def test_fifty_files_dropped_at_once(config, store, inbox):
    params = make_params(config, inbox, stable_seconds=0.0)
    for i in range(50):
        shutil.copy(bccd_field(i), inbox / f"field_{i:02d}.jpg")
    submitted: list[int] = []
    w = watcher(config, store, params, submitted=submitted)
    evs = scan_until_idle(w)
    assert sum(e.kind == "slide" for e in evs) == 50
    assert len(set(submitted)) == 50 and len(slides(store)) == 50
    assert {r.state for r in rows(store)} == {"processing"} and len(rows(store)) == 50
    assert all(s.plan["files"][0]["tiles"] == [[0, 0, 640, 480]] for s in slides(store))


def test_grouping_by_subfolder_and_pattern(config, store, tmp_path):
    by_folder, by_name = tmp_path / "a", tmp_path / "b"
    for i in range(6):
        (by_folder / f"slide{i % 2}").mkdir(parents=True, exist_ok=True)
        shutil.copy(bccd_field(i), by_folder / f"slide{i % 2}" / f"f{i}.jpg")
    by_name.mkdir()
    for i in range(6):
        shutil.copy(bccd_field(10 + i), by_name / f"case{7 + i % 3}_field{i}.jpg")
    shutil.copy(bccd_field(20), by_name / "label.jpg")  # no slide id in its name: ignored
    params = WatchParams(**{
        **make_params(config, by_folder).model_dump(),
        "folders": [{"path": str(by_folder), "um_per_px": BCCD_UM_PER_PX, "grouping": "subfolder"},
                    {"path": str(by_name), "um_per_px": BCCD_UM_PER_PX, "grouping": "pattern",
                     "pattern": r"^(?P<slide>case\d+)_field\d+"}],
        "stable_seconds": 0.0})
    scan_until_idle(watcher(config, store, params))
    got = {s.name: len(s.plan["files"]) for s in slides(store)}
    assert got == {"slide0": 3, "slide1": 3, "case7": 2, "case8": 2, "case9": 2}
    assert all(s.plan["files"][0]["path"].endswith(("f0.jpg", "f1.jpg", "field0.jpg", "field1.jpg",
                                                      "field2.jpg")) for s in slides(store))
    assert (by_name / "label.jpg").exists()


def test_a_scanner_naming_files_by_barcode_fills_each_slides_case(config, store, inbox,
                                                                   tmp_path):
    """``case_pattern`` reads the case from the slide's name, audited as such; a name it
    does not fit, or a value that is no valid case (a date that does not exist), still
    queues the slide, its case left for the reviewer."""
    from daemon.config import load_config
    from daemon.models import AuditEvent
    from pipeline.errors import ConfigError

    pattern = r"^(?P<accession>BM\d{2}-\d{5})_(?P<collected_on>\d{4}-\d{2}-\d{2})"
    params = make_params(config, inbox, stable_seconds=0.0, folder={"case_pattern": pattern})
    for i, name in enumerate(("BM26-00417_2026-11-30.jpg", "BM26-00418_2026-02-30.jpg",
                              "label.jpg")):
        shutil.copy(bccd_field(5 + i), inbox / name)
    scan_until_idle(watcher(config, store, params))
    cases = {s.name: s.case_info for s in slides(store)}
    assert cases == {"BM26-00417_2026-11-30.jpg": {"accession": "BM26-00417",
                                                   "collected_on": "2026-11-30"},
                     "BM26-00418_2026-02-30.jpg": None, "label.jpg": None}
    with store.session() as s:
        (ev,) = s.scalars(select(AuditEvent).where(AuditEvent.action == "submit")).all()
        assert ev.username == "scanner folder" and ev.after["case_pattern"] == pattern
        assert ev.after["case"]["accession"] == "BM26-00417"
    lab = tmp_path / "lab.yaml"
    lab.write_text("watch:\n  folder_defaults:\n    case_pattern: '^(?P<barcode>\\w+)'\n")
    with pytest.raises(ConfigError, match=r"watch\.folder_defaults\.case_pattern.*barcode"):
        load_config(lab)
    lab.write_text(f"watch:\n  folders:\n  - path: {inbox}\n    case_pattern: '(?P<accession>'\n")
    with pytest.raises(ConfigError, match=r"case_pattern is not a valid regex"):
        load_config(lab)


def test_broken_files_are_quarantined_and_valid_ones_complete(config, store, inbox, pyramid_bytes):
    params = make_params(config, inbox, stable_seconds=0.0, folder={"um_per_px": None})
    (inbox / "truncated.tif").write_bytes(pyramid_bytes[: len(pyramid_bytes) // 3])
    (inbox / "empty.svs").write_bytes(b"")
    shutil.copy(bccd_field(3), inbox / "jpeg_named.svs")          # wrong extension
    (inbox / "notes.tiff").write_text("not an image\n")            # wrong content
    shutil.copy(WSI / "unopenable.tiff", inbox / "unopenable.tiff")  # undecodable
    shutil.copy(WSI / "unreadable.svs", inbox / "unreadable.svs")    # undecodable
    shutil.copy(bccd_field(4), inbox / "no_pixel_size.jpg")         # no metadata, no fallback
    shutil.copy(WSI / "CMU-1-Small-Region.svs", inbox / "good.svs")  # valid (mpp in metadata)
    (inbox / "good.tif").write_bytes(pyramid_bytes)                 # valid (resolution tags)
    evs = scan_until_idle(watcher(config, store, params))
    quarantined = {Path(e.path).name: e.reason for e in evs if e.kind == "quarantined"}
    assert set(quarantined) == {"truncated.tif", "empty.svs", "jpeg_named.svs", "notes.tiff",
                                "unopenable.tiff", "unreadable.svs", "no_pixel_size.jpg"}
    assert "truncated" in quarantined["truncated.tif"]
    assert "empty file" in quarantined["empty.svs"]
    assert "extension says TIFF but the content is JPEG" in quarantined["jpeg_named.svs"]
    assert "no pixel size" in quarantined["no_pixel_size.jpg"]
    qdir = inbox / "quarantine"
    for name, reason in quarantined.items():
        assert not (inbox / name).exists() and (qdir / name).exists()
        assert reason in (qdir / f"{name}.error.txt").read_text()
    assert sorted(s.name for s in slides(store)) == ["good.svs", "good.tif"]
    assert all(len(s.plan["files"]) == 1 for s in slides(store))
    states = sorted(r.state for r in rows(store))
    assert states.count("quarantined") == 7 and states.count("processing") == 2
    # The watcher goes on: the next pass neither re-quarantines nor re-queues anything.
    assert watcher(config, store, params).scan_once() == []


def test_path_safety(config, store, inbox, tmp_path):
    params = make_params(config, inbox, stable_seconds=0.0)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(bccd_field(5), outside / "secret.jpg")
    os.symlink(outside / "secret.jpg", inbox / "link.jpg")
    os.symlink(outside, inbox / "linked_dir.jpg")
    shutil.copy(bccd_field(6), inbox / "a..b.jpg")
    shutil.copy(bccd_field(7), inbox / "fine.jpg")
    os.symlink(inbox / "fine.jpg", inbox / "inside_link.jpg")  # stays inside: allowed
    evs = scan_until_idle(watcher(config, store, params))
    refused = {Path(e.path).name: e.reason for e in evs if e.kind == "refused"}
    assert set(refused) == {"link.jpg", "linked_dir.jpg", "a..b.jpg"}
    assert "outside the watch folder" in refused["link.jpg"]
    assert "'..'" in refused["a..b.jpg"]
    assert (outside / "secret.jpg").exists()  # the target itself is never touched
    assert [s.name for s in slides(store)] == ["fine.jpg"]
    assert [Path(e.path).name for e in evs if e.kind == "duplicate"] == ["inside_link.jpg"]
    assert (inbox / "quarantine" / "link.jpg.error.txt").exists()


def test_names_the_store_or_the_disk_cannot_hold_are_refused_and_the_rest_go_on(
        config, store, inbox):
    """A Latin-1 name from an SMB share: writing it to the store had failed every pass,
    so no slide sorting after it was queued again. A 250-character name: its quarantine
    note had been too long to write."""
    params = make_params(config, inbox, stable_seconds=0.0)
    shutil.copy(bccd_field(5), os.fsencode(inbox) + b"/caf\xe9_BM2.jpg")
    shutil.copy(bccd_field(6), inbox / "zzz_after.jpg")
    long_name = "BM-" + "x" * 245 + ".jpg"
    shutil.copy(bccd_field(7), inbox / long_name)
    (inbox / long_name).write_bytes(b"not an image")
    evs = scan_until_idle(watcher(config, store, params))
    assert [s.name for s in slides(store)] == ["zzz_after.jpg"]
    refused = [e for e in evs if e.kind == "refused"]
    assert [e.path for e in refused] == [str(inbox / "caf\\xe9_BM2.jpg")]
    assert "is not valid UTF-8: rename it" in refused[0].reason
    notes = sorted(p.name for p in (inbox / "quarantine").iterdir() if p.name.endswith(".txt"))
    assert len(notes) == 2 and all(len(os.fsencode(n)) <= 255 for n in notes)
    long_note = next(n for n in notes if n.startswith("BM-x"))
    assert long_name in (inbox / "quarantine" / long_note).read_text()  # the whole name


def test_a_rescan_of_the_same_size_with_an_older_time_is_counted(config, store, inbox):
    """A slide scanned again under the same name, same size (uncompressed TIFF, DICOM), copied
    with its original modification time (cp -p, rsync -t, robocopy): it had been passed over
    as already recorded, without a word, for ever."""
    params = make_params(config, inbox, stable_seconds=0.0)
    w = watcher(config, store, params)
    first = bccd_field(5).read_bytes()
    (inbox / "BM-rescan.jpg").write_bytes(first)
    scan_until_idle(w)
    assert [s.name for s in slides(store)] == ["BM-rescan.jpg"]
    # The rescan: other content (one byte of the image data), the same size, an old time.
    second = bytearray(first)
    second[len(second) // 2] ^= 0x01
    (inbox / "BM-rescan.jpg").write_bytes(bytes(second))
    old = time.time() - 1800
    os.utime(inbox / "BM-rescan.jpg", (old, old))
    scan_until_idle(w)
    assert [s.name for s in slides(store)] == ["BM-rescan.jpg", "BM-rescan.jpg (2)"]
    scan_until_idle(w)  # and once only
    assert len(slides(store)) == 2


def test_a_file_whose_inode_alone_changed_is_hashed_once_not_at_every_restart(
        config, store, inbox, monkeypatch):
    """A chmod -R on the share changes every file's inode time: each is hashed once more to
    see it is the same, then recorded so, not hashed again by every later watcher."""
    import drivers.folder as folder

    params = make_params(config, inbox, stable_seconds=0.0)
    shutil.copy(bccd_field(5), inbox / "BM-1.jpg")
    scan_until_idle(watcher(config, store, params))
    hashed = []
    real = folder.sha256_file
    monkeypatch.setattr(folder, "sha256_file", lambda p: hashed.append(p) or real(p))
    time.sleep(0.01)
    os.chmod(inbox / "BM-1.jpg", 0o640)
    for restart in range(3):
        scan_until_idle(watcher(config, store, params))
    assert hashed == [inbox / "BM-1.jpg"] and len(slides(store)) == 1


def test_a_passing_store_error_ends_the_pass_and_the_next_one_queues_the_slide(
        config, store, inbox, monkeypatch):
    """"database is locked" once: the slide had been set aside until a restart, and
    `watch --once` waited for it for ever."""
    from sqlalchemy.exc import OperationalError

    params = make_params(config, inbox, stable_seconds=0.0)
    w = watcher(config, store, params)
    real, calls = w._row, []

    def locked_once(sha):
        calls.append(sha)
        if len(calls) == 1:
            raise OperationalError("SELECT", {}, Exception("database is locked"))
        return real(sha)

    monkeypatch.setattr(w, "_row", locked_once)
    shutil.copy(bccd_field(5), inbox / "BM-1.jpg")
    ended = 0
    for _ in range(10):  # as the watcher's own loop: a pass that raises is logged, retried
        try:
            w.scan_once()
        except OperationalError:
            ended += 1
        time.sleep(0.05)
    assert ended == 1
    assert [s.name for s in slides(store)] == ["BM-1.jpg"] and w.waiting() == 0


def test_slides_queued_before_the_store_failed_mid_pass_are_still_reported(
        config, store, inbox, monkeypatch):
    """The store refusing the settling that ends a pass: the slide queued earlier in that
    pass had never been reported (no "slide" event, no submit to wake the daemon), and the
    next pass found its file recorded."""
    from sqlalchemy.exc import OperationalError

    params = make_params(config, inbox, stable_seconds=0.0)
    events, submitted = [], []
    w = watcher(config, store, params, events, submitted)
    real, calls = w._settle, []

    def locked_once(evs):
        calls.append(1)
        if len(calls) == 1:
            raise OperationalError("SELECT", {}, Exception("database is locked"))
        return real(evs)

    monkeypatch.setattr(w, "_settle", locked_once)
    shutil.copy(bccd_field(5), inbox / "BM-1.jpg")
    with pytest.raises(OperationalError):
        w.scan_once()
    w.scan_once()
    (slide,) = slides(store)
    assert [(e.kind, e.slide_id) for e in events] == [("slide", slide.id)]
    assert submitted == [slide.id]


def test_file_that_fails_mid_count_is_quarantined(config, store, inbox, tmp_path):
    """A tile that only breaks when it is read (after the slide was planned): the source
    raises, the daemon fails the slide with that reason, and the next pass quarantines it."""
    from drivers.acquisition import AcquisitionError
    from drivers.wsi_fields import source_from_plan

    good = write_pyramid(tmp_path / "g.tif", bccd_mosaic(4, 3), BCCD_UM_PER_PX, compression="zlib",
                         tile=128)
    data = bytearray(good.read_bytes())
    with tifffile.TiffFile(good) as tif:
        page = tif.pages[0]
        off, n = page.dataoffsets[-1], page.databytecounts[-1]  # level 0, last tile
    data[off:off + n] = b"\x00" * n
    (inbox / "late.tif").write_bytes(bytes(data))
    params = make_params(config, inbox, stable_seconds=0.0, folder={"area_um": None})
    w = watcher(config, store, params)
    (ev,) = [e for e in scan_until_idle(w) if e.kind == "slide"]
    slide = store.slide(ev.slide_id)
    gate_off = config.acquisition.quality.model_copy(update={"enabled": False})
    with pytest.raises(AcquisitionError, match="late.tif: cannot decode tile") as err:
        for _ in source_from_plan(slide.plan, gate_off, config.detect).fields():
            pass
    store.set_status(slide.id, "acquiring", expect="queued")
    store.set_status(slide.id, "failed", error=str(err.value), stopped_because="failed")
    evs = w.scan_once()
    assert [(e.kind, Path(e.path).name) for e in evs] == [("quarantined", "late.tif")]
    assert "cannot decode tile" in (inbox / "quarantine" / "late.tif.error.txt").read_text()
    assert [r.state for r in rows(store)] == ["quarantined"]


def test_from_config_without_folders_does_nothing(config, store):
    w = FolderWatcher.from_config(config, store)
    assert config.watch.folders == () and w.scan_once() == []
    w.start()
    w.stop()


def test_quarantine_that_cannot_move_the_file_still_goes_on(config, store, inbox):
    # A plain file where the quarantine folder should be: the move fails as on a read-only share.
    (inbox / "quarantine").write_text("not a folder")
    (inbox / "bad.tif").write_bytes(b"II*\x00junk")
    shutil.copy(bccd_field(8), inbox / "ok.jpg")
    w = watcher(config, store, make_params(config, inbox, stable_seconds=0.0))
    evs = scan_until_idle(w)
    assert sorted((e.kind, Path(e.path).name) for e in evs) == [("quarantined", "bad.tif"),
                                                                 ("slide", "ok.jpg")]
    reason = [e.reason for e in evs if e.kind == "quarantined"][0]
    assert "could not move it to quarantine/" in reason
    assert reason in (inbox / "bad.tif.error.txt").read_text()
    assert [r.state for r in rows(store) if r.slide_id is None] == ["quarantined"]
    assert w.scan_once() == []


def test_restart_does_not_rehash_recorded_files_but_does_a_rewritten_one(config, store, inbox):
    for i in range(3):
        shutil.copy(bccd_field(30 + i), inbox / f"r{i}.jpg")
    params = make_params(config, inbox, stable_seconds=0.0)
    scan_until_idle(watcher(config, store, params))
    assert len(slides(store)) == 3
    w = watcher(config, store, params)
    assert w.scan_once() == [] and w._hashes == {}  # nothing was read again
    time.sleep(0.05)
    shutil.copy(bccd_field(40), inbox / "r1.jpg")  # the scanner rewrote a file: new content
    evs = scan_until_idle(w)
    assert [(e.kind, Path(e.path).name) for e in evs] == [("slide", "r1.jpg")]
    assert sorted(s.name for s in slides(store)) == ["r0.jpg", "r1.jpg", "r1.jpg (2)", "r2.jpg"]


def test_a_broken_mrxs_goes_to_quarantine_with_its_data_folder(config, store, inbox):
    """MRXS is an index file plus a same-named data folder; OpenSlide cannot open this one
    (its index is not a slide), so both move to quarantine together."""
    params = make_params(config, inbox, stable_seconds=0.0)
    for name in ("BM-9.mrxs", "BM-10.MRXS"):  # scanners write either case
        (inbox / name).write_text("[GENERAL]\nSLIDE_VERSION=not a slide\n")
        data = inbox / name[:-5]
        data.mkdir()
        (data / "Slidedat.ini").write_text("[GENERAL]\n")
        (data / "Data0000.dat").write_bytes(b"\x00" * 4096)
    evs = scan_until_idle(watcher(config, store, params))
    quarantined = [e for e in evs if e.kind == "quarantined"]
    assert sorted(Path(e.path).name for e in quarantined) == ["BM-10.MRXS", "BM-9.mrxs"]
    qdir = inbox / "quarantine"
    for e in quarantined:
        name = Path(e.path).name
        assert not (inbox / name).exists() and not (inbox / name[:-5]).exists()
        assert (qdir / name).is_file() and (qdir / name[:-5] / "Data0000.dat").is_file()
        assert e.reason in (qdir / f"{name}.error.txt").read_text()
    assert slides(store) == []


def test_a_file_put_back_after_quarantine_or_a_failed_slide_is_tried_afresh(config, store,
                                                                           inbox):
    """A quarantined file keeps its verdict only while it stays out of the folder; put back
    once the cause is fixed (the folder's pixel size set), it is counted. A failed slide's
    file goes to quarantine with the slide's error, and is queued again, as a new slide, only
    when a person puts it back (never by itself at a restart)."""
    no_size = make_params(config, inbox, stable_seconds=0.0, folder={"um_per_px": None})
    shutil.copy(bccd_field(4), inbox / "field.jpg")
    evs = scan_until_idle(watcher(config, store, no_size))
    assert [(e.kind, Path(e.path).name) for e in evs] == [("quarantined", "field.jpg")]
    assert "no pixel size" in evs[0].reason
    fixed = make_params(config, inbox, stable_seconds=0.0)  # the lab sets um_per_px
    shutil.move(inbox / "quarantine" / "field.jpg", inbox / "field.jpg")
    w = watcher(config, store, fixed)
    evs = scan_until_idle(w)
    assert [(e.kind, Path(e.path).name) for e in evs] == [("slide", "field.jpg")]
    assert [s.name for s in slides(store)] == ["field.jpg"]

    # The slide fails for a cause outside the file: the file goes to quarantine, saying why.
    sid = slides(store)[0].id
    store.set_status(sid, "acquiring")
    store.set_status(sid, "failed", error="the store could not be written (disk full)")
    evs = scan_until_idle(w)
    assert [(e.kind, Path(e.path).name) for e in evs] == [("quarantined", "field.jpg")]
    assert "its slide failed: the store could not be written" in evs[0].reason
    assert scan_until_idle(watcher(config, store, fixed), passes=5) == []  # a restart: nothing
    # Put back (the first verdict's note is still there, so this one is "field.jpg.1"): the
    # failed slide stays as it was, and the file is counted as a new slide.
    shutil.move(inbox / "quarantine" / "field.jpg.1", inbox / "field.jpg")
    evs = scan_until_idle(watcher(config, store, fixed))
    assert [(e.kind, Path(e.path).name) for e in evs] == [("slide", "field.jpg")]
    assert sorted((s.name, s.status) for s in slides(store)) == [
        ("field.jpg", "failed"), ("field.jpg (2)", "queued")]
    # A file whose slide did not fail is never counted twice: a copy is a duplicate.
    store.set_status(slides(store)[1].id, "acquiring")
    store.set_status(slides(store)[1].id, "awaiting_review", stopped_because="target_reached")
    scan_until_idle(watcher(config, store, fixed), passes=5)
    shutil.copy(inbox / "field.jpg", inbox / "field copy.jpg")
    evs = scan_until_idle(watcher(config, store, fixed))
    assert [(e.kind, Path(e.path).name) for e in evs] == [("duplicate", "field copy.jpg")]
    assert len(slides(store)) == 2 and len(rows(store)) == 1


def test_stop_while_planning_a_large_file_ends_at_the_next_slide(config, store, inbox,
                                                                  monkeypatch):
    """stop() gives up waiting after its timeout, but the watcher's thread, still planning a
    large file, must stop before the next slide (it planned every remaining file, beside a
    new watcher after a reload, once stop() had forgotten it)."""
    import threading

    import drivers.folder as folder_mod

    for i in range(3):
        shutil.copy(bccd_field(10 + i), inbox / f"f{i}.jpg")
    started, release = threading.Event(), threading.Event()
    real_plan = folder_mod.plan_file

    def slow_plan(*args, **kw):
        started.set()
        release.wait(30)  # a multi-GB scan being read
        return real_plan(*args, **kw)

    monkeypatch.setattr(folder_mod, "plan_file", slow_plan)
    w = watcher(config, store, make_params(config, inbox, stable_seconds=0.0))
    w.start()
    assert started.wait(30)
    w.stop(timeout=0.1)
    thread = w._thread
    assert thread is not None and thread.is_alive()  # still planning: not forgotten
    release.set()
    thread.join(30)
    assert not thread.is_alive()
    assert len(slides(store)) == 1  # the file being planned is finished, no further one


def test_a_failed_slides_file_that_was_gone_counts_again_when_put_back(config, store, inbox,
                                                                       tmp_path):
    """The slide failed because its file went missing mid-count (moved away during a
    crash): put back at the same path, unchanged, the file is counted as a new slide."""
    fixed = make_params(config, inbox, stable_seconds=0.0)
    shutil.copy(bccd_field(5), inbox / "gone.jpg")
    (inbox / "scanner.log").write_text("the share is there: the file alone went\n")
    w = watcher(config, store, fixed)
    assert [e.kind for e in scan_until_idle(w)] == ["slide"]
    sid = slides(store)[0].id
    shutil.move(inbox / "gone.jpg", tmp_path / "gone.jpg")  # mtime kept
    store.set_status(sid, "acquiring")
    store.set_status(sid, "failed", error="gone.jpg: no such file")
    evs = scan_until_idle(w)
    assert [(e.kind, e.reason) for e in evs] == [
        ("done", "its slide failed: gone.jpg: no such file")]
    shutil.move(tmp_path / "gone.jpg", inbox / "gone.jpg")
    evs = scan_until_idle(watcher(config, store, fixed))
    assert [(e.kind, Path(e.path).name) for e in evs] == [("slide", "gone.jpg")]
    assert sorted((s.name, s.status) for s in slides(store)) == [
        ("gone.jpg", "failed"), ("gone.jpg (2)", "queued")]


def test_a_file_that_vanishes_while_read_is_taken_when_it_comes_back(
        config, store, inbox, pyramid_bytes, monkeypatch):
    """A scanner deletes and rewrites a file while the watcher reads it: nothing is
    quarantined (it had been, as "no such file", with a note left in the watch folder and
    its path blocked until a restart), and the whole file delivered again is counted."""
    import drivers.folder as folder

    target = inbox / "s1.tif"
    real, gone = folder.plan_file, []

    def vanishing(path, *a, **k):
        if Path(path) == target and not gone:
            gone.append(path)
            os.unlink(path)
        return real(path, *a, **k)

    monkeypatch.setattr(folder, "plan_file", vanishing)
    w = watcher(config, store, make_params(config, inbox, stable_seconds=0.0))
    target.write_bytes(pyramid_bytes)
    assert [e.kind for e in scan_until_idle(w, passes=8)] == [] and gone
    assert sorted(os.listdir(inbox)) == [] and slides(store) == []
    target.write_bytes(pyramid_bytes)  # delivered again, whole
    assert [e.kind for e in scan_until_idle(w)] == ["slide"]
    assert len(slides(store)) == 1 and not (inbox / "quarantine").exists()


def test_folder_away_judges_the_nearest_folder_of_a_missing_file_that_is_there(tmp_path):
    """A missing file's share is away when the first folder met going up from it is empty,
    unreadable or a link to nothing; a populated one means the file was deleted."""
    root = tmp_path / "scans"
    (root / "scannerB").mkdir(parents=True)
    (root / "scannerB" / "x.svs").write_bytes(b"another scanner's slide")
    (root / "scannerA").symlink_to(tmp_path / "mnt" / "scannerA")  # its target unmounted
    assert folder_away(root / "scannerA" / "case" / "s.svs", root) == root / "scannerA"
    assert folder_away(root / "scannerB" / "case" / "s.svs", root) is None  # case deleted
    (root / "scannerC").mkdir()  # an empty mount point
    assert folder_away(root / "scannerC" / "s.svs", root) == root / "scannerC"
    assert folder_away(tmp_path / "gone" / "s.svs", tmp_path / "gone") == tmp_path / "gone"
