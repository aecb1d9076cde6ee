"""Scanner folder to counted slide, end to end: ``marrowcount watch --once`` on real files with
the shipped classifier, killed mid-count and run again: nothing lost, nothing counted twice."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import select

from daemon.config import load_config
from daemon.models import ScannedFile
from daemon.store import Store
from drivers.folder import FolderWatcher, WatchParams
from drivers.slide_image import write_pyramid
from tests.conftest import BCCD_UM_PER_PX, REPO
from tests.slide_fixtures import bccd_field, bccd_mosaic

TARGET = 6


@pytest.fixture
def lab(tmp_path, config):
    """A lab config over the defaults: a private store; one BCCD field per counting field; the
    quality gate off and the area's nucleated floor at 1 (peripheral blood has ~1 leukocyte
    per field, marrow settings want more)."""
    inbox = tmp_path / "scanner"
    inbox.mkdir()
    cfg = {
        "store": {"url": f"sqlite:///{tmp_path / 'store.db'}", "data_dir": str(tmp_path / "data")},
        "service": {"metrics_port": 0, "log_format": "text", "log_level": "warning"},
        "acquisition": {"target": TARGET, "quality": {"enabled": False}},
        "watch": {"stable_seconds": 0.0,
                  "wsi": {"field_um": [640 * BCCD_UM_PER_PX, 480 * BCCD_UM_PER_PX],
                          "min_nucleated": 1}},
    }
    path = tmp_path / "lab.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return inbox, path, cfg


def run_watch(inbox: Path, cfg_path: Path, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "from daemon.cli import main; main()", "watch", str(inbox),
           "--once", "--json",
           "--um-per-px", str(BCCD_UM_PER_PX), "--config", str(cfg_path)]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1",
                                            "PYTHONPATH": str(REPO)}, **kw)


def check_consistent(store: Store, slide_id: int) -> None:
    """Fields 0..n-1 once each; the running counts equal a recount of the stored cells."""
    fields = store.fields(slide_id)
    assert [f.index for f in fields] == list(range(len(fields)))
    recount = Counter(c.label for c in store.cells(slide_id) if c.duplicate_of is None)
    assert store.counts(slide_id) == {k: v for k, v in recount.items() if v}
    assert sum(f.n_counted for f in fields) == sum(
        n for k, n in recount.items() if k != "non_leukocyte")


def test_watch_once_counts_each_slide_and_settles_files(lab):
    inbox, cfg_path, cfg = lab
    write_pyramid(inbox / "slide_a.tif", bccd_mosaic(4, 4), BCCD_UM_PER_PX)
    for i in range(3):
        shutil.copy(bccd_field(40 + i), inbox / f"field_{i}.jpg")
    (inbox / "broken.tif").write_bytes(b"II*\x00garbage")
    proc = run_watch(inbox, cfg_path)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    kinds = Counter(e["event"] for e in events)
    assert kinds["slide"] == 4 and kinds["counted"] == 4 and kinds["quarantined"] == 1
    assert kinds["done"] == 4
    store = Store(cfg["store"]["url"], cfg["store"]["data_dir"])
    try:
        by_name = {s.name: s for s in store.slides()}
        assert set(by_name) == {"slide_a.tif", "field_0.jpg", "field_1.jpg", "field_2.jpg"}
        a = by_name["slide_a.tif"]
        assert a.status == "awaiting_review" and len(a.plan["files"][0]["tiles"]) >= 10
        progress = store.progress(a.id)
        assert progress.n_fields > 0
        assert (a.stopped_because == "target_reached") == (progress.counted >= TARGET)
        for s in by_name.values():
            check_consistent(store, s.id)
        with store.session() as ss:
            states = Counter(r.state for r in ss.scalars(select(ScannedFile)))
        assert states == {"done": 4, "quarantined": 1}
        # Everything is recorded: another watcher on this store finds nothing to do.
        lab_cfg = load_config(cfg_path)
        params = WatchParams(**{**lab_cfg.watch.model_dump(),
                                "folders": [{"path": str(inbox), "um_per_px": BCCD_UM_PER_PX}]})
        w = FolderWatcher(params, store, target=TARGET, taxonomy=lab_cfg.taxonomy,
                          detect=lab_cfg.detect)
        assert w.scan_once() == [] and w.scan_once() == []
    finally:
        store.close()


def test_watch_once_waits_out_a_store_that_refuses_its_passes(lab, monkeypatch):
    """"database is locked" (a backup, another process writing) during `watch --once`: the
    command had ended with a traceback, its backlog not counted; it tries again."""
    from sqlalchemy.exc import OperationalError
    from typer.testing import CliRunner

    from daemon.cli import app

    inbox, cfg_path, cfg = lab
    shutil.copy(bccd_field(40), inbox / "field_0.jpg")
    real, calls = FolderWatcher._settle, []

    def locked_twice(self, events):
        calls.append(1)
        if len(calls) <= 2:
            raise OperationalError("SELECT", {}, Exception("database is locked"))
        return real(self, events)

    monkeypatch.setattr(FolderWatcher, "_settle", locked_twice)
    r = CliRunner().invoke(app, ["watch", str(inbox), "--once", "--json", "--um-per-px",
                                 str(BCCD_UM_PER_PX), "--config", str(cfg_path)])
    assert r.exit_code == 0, r.output
    kinds = Counter(json.loads(line)["event"] for line in r.output.splitlines()
                    if line.startswith("{"))
    assert kinds == {"slide": 1, "counted": 1, "done": 1}, r.output


def test_kill_mid_count_then_rerun_loses_and_repeats_nothing(lab):
    inbox, cfg_path, cfg = lab
    for k in range(2):
        write_pyramid(inbox / f"s{k}.tif", bccd_mosaic(4, 3, start=12 * k), BCCD_UM_PER_PX)
    store = Store(cfg["store"]["url"], cfg["store"]["data_dir"])
    try:
        proc = run_watch(inbox, cfg_path)
        deadline = time.monotonic() + 300
        killed_at = None
        while time.monotonic() < deadline and proc.poll() is None:
            slides = store.slides()
            n_fields = sum(store.progress(s.id).n_fields for s in slides)
            if n_fields >= 2:
                proc.send_signal(signal.SIGKILL)
                killed_at = n_fields
                break
            time.sleep(0.05)
        proc.communicate(timeout=60)
        assert killed_at is not None, "the count finished before the kill; nothing was tested"
        rerun = run_watch(inbox, cfg_path)
        out, err = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, err
        slides = store.slides()
        assert sorted(s.name for s in slides) == ["s0.tif", "s1.tif"]
        for s in slides:
            assert s.status == "awaiting_review", (s.name, s.status, s.error)
            check_consistent(store, s.id)
        with store.session() as ss:
            rows = list(ss.scalars(select(ScannedFile)))
        assert len(rows) == 2 and {r.state for r in rows} == {"done"}
    finally:
        store.close()


def test_a_new_folder_slide_is_started_and_an_interrupted_one_resumed(lab):
    """A folder slide comes with its plan from the watcher: its first count is a start (the
    daemon logged 'slide resumed, from field 0'); after an interruption it resumes."""
    from daemon.service import Service

    inbox, cfg_path, cfg = lab
    write_pyramid(inbox / "s.tif", bccd_mosaic(4, 3), BCCD_UM_PER_PX)
    lab_cfg = load_config(cfg_path)
    lab_cfg = lab_cfg.model_copy(update={"watch": WatchParams(**{
        **lab_cfg.watch.model_dump(),
        "folders": [{"path": str(inbox), "um_per_px": BCCD_UM_PER_PX}]})})
    starts: list[bool] = []

    def on_event(e) -> None:
        if e.kind == "slide_started":
            starts.append(e.data["resumed"])
        if e.kind == "field":
            svc.request_stop()  # as SIGTERM: finish this field, then stop

    for _ in range(2):
        svc = Service(lab_cfg, cfg_path, on_event=on_event)
        try:
            w = FolderWatcher(lab_cfg.watch, svc.store, target=TARGET,
                              taxonomy=lab_cfg.taxonomy, detect=lab_cfg.detect)
            for _ in range(20):
                if svc.store.slides():
                    break
                w.scan_once()
                time.sleep(0.05)
            svc.run(exit_when_idle=True)
        finally:
            svc.close()
    assert starts == [False, True]


def _queue_and_run(svc, lab_cfg, scan: bool = True) -> FolderWatcher:
    """A watcher over the lab's folders queues what is there (``scan``), then the service
    counts until it is idle; returns the watcher."""
    w = FolderWatcher(lab_cfg.watch, svc.store, target=TARGET, taxonomy=lab_cfg.taxonomy,
                      detect=lab_cfg.detect)
    for _ in range(20 if scan else 0):
        w.scan_once()
        if svc.store.slides():
            break
        time.sleep(0.05)
    svc.run(exit_when_idle=True)
    return w


def _watching(cfg_path: Path, inbox: Path, **folder) -> Any:
    """The lab's config watching ``inbox`` (with ``folder`` settings), a paused slide
    retried after 0.2 s."""
    lab_cfg = load_config(cfg_path)
    return lab_cfg.model_copy(update={
        "watch": WatchParams(**{**lab_cfg.watch.model_dump(), "folders": [
            {"path": str(inbox), "um_per_px": BCCD_UM_PER_PX, **folder}]}),
        "service": lab_cfg.service.model_copy(update={"retry_slide_after_s": 0.2})})


class _StopAfterFirstField:
    """A service's on_event: stops it (as SIGTERM) after the first field it counts, and
    keeps why slides paused. ``service`` builds one that reports here."""

    def __init__(self, lab_cfg: Any, cfg_path: Path) -> None:
        self.lab_cfg, self.cfg_path = lab_cfg, cfg_path
        self.fields, self.paused, self.svc = 0, [], None

    def service(self) -> Any:
        from daemon.service import Service

        self.svc = Service(self.lab_cfg, self.cfg_path, on_event=self)
        return self.svc

    def __call__(self, e: Any) -> None:
        if e.kind == "field":
            self.fields += 1
            if self.fields == 1:
                self.svc.request_stop()
        if e.kind == "slide_paused":
            self.paused.append(e.data["reason"])


@pytest.mark.parametrize("mounted", ["at the watch folder", "below it"])
def test_a_scanner_share_away_mid_slide_pauses_it_and_it_resumes_once(lab, mounted):
    """The share holding a slide's file unmounted between fields: the slide had failed on
    "no such file", and when the share was back its file was counted again as a second
    slide. It waits instead, and resumes where it stood. A share mounted at the watch folder
    is renamed away here; one mounted below it (scans/scannerA beside a populated
    scans/scannerB) leaves its empty mount point, as an unmount does."""
    inbox, cfg_path, cfg = lab
    share = inbox if mounted == "at the watch folder" else inbox / "scannerA"
    share.mkdir(exist_ok=True)
    write_pyramid(share / "s.tif", bccd_mosaic(4, 3), BCCD_UM_PER_PX)
    if share != inbox:
        (inbox / "scannerB").mkdir()
        (inbox / "scannerB" / "notes.txt").write_text("another scanner's share, mounted")
    events = _StopAfterFirstField(_watching(cfg_path, inbox), cfg_path)
    away = inbox.with_name("share.unmounted")
    for step in ("first field", "share away", "share back"):
        if step == "share away":
            share.rename(away)
            if share != inbox:
                share.mkdir()  # the mount point stays, empty
        if step == "share back":
            if share != inbox:
                share.rmdir()
            away.rename(share)
        svc = events.service()
        try:
            w = _queue_and_run(svc, events.lab_cfg)
            w.scan_once()  # settles what finished; the share's absence settles nothing
            (slide,) = svc.store.slides()
            if step == "share away":
                assert slide.status == "acquiring", slide.error
                assert events.paused[-1].startswith(
                    f"scanner folder not reachable: {share} is gone")
            if step == "share back":
                assert slide.status == "awaiting_review", slide.error
                check_consistent(svc.store, slide.id)
                with svc.store.session() as ss:
                    assert [r.state for r in ss.scalars(select(ScannedFile))] == ["done"]
        finally:
            svc.close()


def test_a_folder_slide_whose_file_was_deleted_from_a_share_that_is_there_fails(lab):
    """Only the watch folder gone or empty is a share away: a case folder deleted from a
    share that is there (the wrong case removed) had waited for ever, holding its place."""
    inbox, cfg_path, cfg = lab
    (inbox / "case1").mkdir()
    write_pyramid(inbox / "case1" / "s.tif", bccd_mosaic(4, 3), BCCD_UM_PER_PX)
    events = _StopAfterFirstField(_watching(cfg_path, inbox, grouping="subfolder"), cfg_path)
    for step in ("first field", "case deleted"):
        if step == "case deleted":
            shutil.rmtree(inbox / "case1")
            shutil.copy(bccd_field(3), inbox / "other-case.jpg")  # the share is there
        svc = events.service()
        try:
            _queue_and_run(svc, events.lab_cfg, scan=step == "first field")
            slide = svc.store.slides()[0]
            if step == "case deleted":
                assert slide.status == "failed" and "no such file" in slide.error, slide.error
        finally:
            svc.close()


def test_a_share_away_too_long_fails_its_slide_and_frees_its_place(lab, monkeypatch):
    """Away past service.FOLDER_AWAY_MAX_S (an hour; a second here) is no blip: the slide
    fails with why, instead of holding its place for ever."""
    import daemon.service as service

    inbox, cfg_path, cfg = lab
    write_pyramid(inbox / "s.tif", bccd_mosaic(4, 3), BCCD_UM_PER_PX)
    monkeypatch.setattr(service, "FOLDER_AWAY_MAX_S", 1.0)
    events = _StopAfterFirstField(_watching(cfg_path, inbox), cfg_path)
    svc = events.service()
    try:
        _queue_and_run(svc, events.lab_cfg)
    finally:
        svc.close()
    inbox.rename(inbox.with_name("scanner.unmounted"))
    svc = events.service()
    runner = threading.Thread(target=svc.run)  # the daemon, retrying as it does unattended
    runner.start()
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            (slide,) = svc.store.slides()
            if slide.status != "acquiring":
                break
            time.sleep(0.1)
        svc.request_stop()
        runner.join(60)
        assert slide.status == "failed", slide.error
        assert "was away for over" in slide.error and "no such file" in slide.error
    finally:
        svc.close()
