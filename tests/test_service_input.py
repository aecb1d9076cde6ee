"""Bad input to the daemon and the queue commands gets a clear error and loses nothing;
SIGHUP reloads the config (and keeps the running one when the new file is broken)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from daemon.cli import app
from daemon.store import StoreError
from pipeline.errors import ConfigError, ImageError
from tests.conftest import BCCD, REPO, WSI
from tests.daemon_fixtures import (
    DAEMON,
    bccd_slide_file,
    daemon_config,
    daemon_env,
    kill9,
    start_daemon,
    wait_for_log,
)

runner = CliRunner()


def _fails(args, exc_type, text):
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    assert isinstance(res.exception, exc_type), res.output
    assert text in str(res.exception)
    return res


def test_missing_config_is_one_clear_line_at_start(tmp_path):
    proc = subprocess.run([*DAEMON, "daemon", "--config", str(tmp_path / "nope.yaml")],
                          cwd=REPO, env=daemon_env(), capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert "nope.yaml does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_corrupt_or_invalid_config_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: [unclosed\n")
    _fails(["daemon", "--config", str(bad)], ConfigError, "is not valid YAML")
    bad.write_text("service:\n  poll_seconds: -1\n")
    _fails(["daemon", "--config", str(bad)], ConfigError, "service.poll_seconds")
    bad.write_text("service:\n  pol_seconds: 1\n")
    _fails(["daemon", "--config", str(bad)], ConfigError, "service.pol_seconds")
    bad.write_text("service:\n  webhook_url: notaurl\n")  # failed only at the first event
    _fails(["daemon", "--config", str(bad)], ConfigError, "service.webhook_url")
    from daemon.config import load_config

    for url in ("HTTPS://chat.example.org/hook", " https://chat.example.org/hook "):
        assert load_config(overrides={"service": {"webhook_url": url}}).service.webhook_url \
            == url.strip()


def test_database_that_is_not_sqlite_is_never_overwritten(tmp_path):
    db = tmp_path / "results.db"
    shutil.copy(BCCD / "JPEGImages" / "BloodImage_00000.jpg", db)
    before = db.read_bytes()
    config = daemon_config(tmp_path, f"sqlite:///{db}")
    _fails(["daemon", "--config", str(config)], StoreError, "is not a SQLite database")
    _fails(["submit", str(WSI / "small.svs"), "--config", str(config)], StoreError,
           "is not a SQLite database")
    assert db.read_bytes() == before


def test_submit_refuses_missing_and_unreadable_slides(tmp_path):
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'q.db'}")
    _fails(["submit", str(tmp_path / "missing.tif"), "--config", str(config)],
           Exception, "no such slide file")
    _fails(["submit", str(WSI / "unopenable.tiff"), "--config", str(config)], ImageError,
           "unopenable.tiff")
    slide = bccd_slide_file(tmp_path, cols=2, rows=1)
    res = runner.invoke(app, ["submit", str(slide), "--name", "S1", "--target", "300",
                              "--config", str(config), "--json"])
    assert res.exit_code == 0, res.output
    sub = json.loads(res.stdout)
    assert sub["status"] == "queued" and sub["source"] == "virtual" and sub["target"] == 300
    _fails(["submit", str(slide), "--name", "S1", "--config", str(config)], StoreError,
           "already exists")
    res = runner.invoke(app, ["status", "--json", "--config", str(config)])
    rows = json.loads(res.stdout)
    assert [(r["name"], r["status"], r["counted"]) for r in rows] == [("S1", "queued", 0)]
    res = runner.invoke(app, ["status", "--config", str(config)])
    assert res.exit_code == 0 and "S1 (queued)" in res.stdout and "0/300" in res.stdout


def test_one_slide_at_a_time_on_a_microscope(tmp_path):
    """The stage holds one glass: a second slide submitted for the same microscope while the
    first is queued would be counted on the first one's glass under another patient."""
    from daemon.store import Store
    from tests.acquire_fixtures import write_cfg

    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'q.db'}")
    scope = write_cfg(tmp_path / "scope.cfg")
    ok = runner.invoke(app, ["submit", str(scope), "--name", "BM-A", "--patient-id", "P1",
                             "--config", str(config)])
    assert ok.exit_code == 0, ok.output
    _fails(["submit", str(scope), "--name", "BM-B", "--patient-id", "P2", "--config",
            str(config)], Exception, "slide 'BM-A' on the microscope of scope.cfg is still queued")
    other = write_cfg(tmp_path / "scope2.cfg")  # another microscope is free
    assert runner.invoke(app, ["submit", str(other), "--name", "BM-C", "--config",
                               str(config)]).exit_code == 0
    with Store(f"sqlite:///{tmp_path / 'q.db'}", tmp_path / "data") as store:
        sid = next(s.id for s in store.slides(None) if s.name == "BM-A")
        store.claim(sid, "scope-1")
    # Being counted, it holds the stage just the same.
    _fails(["submit", str(scope), "--name", "BM-B", "--patient-id", "P2", "--config",
            str(config)], Exception, "slide 'BM-A' on the microscope of scope.cfg is still")
    with Store(f"sqlite:///{tmp_path / 'q.db'}", tmp_path / "data") as store:
        store.set_status(sid, "awaiting_review")
    assert runner.invoke(app, ["submit", str(scope), "--name", "BM-B", "--config",
                               str(config)]).exit_code == 0
    # A slide that will never be counted (its glass was taken off) is cancelled, with why.
    _fails(["cancel", "BM-B", "--reason", " ", "--config", str(config)], Exception,
           "say why")
    # Run as the documented `sudo -u marrowcount marrowcount cancel ...`: the audit names
    # the person, not the service account.
    res = runner.invoke(app, ["cancel", "BM-B", "--reason", "slide broken on the stage",
                              "--config", str(config)], env={"SUDO_USER": "tech.anna"})
    assert res.exit_code == 0, res.output
    _fails(["cancel", "BM-B", "--reason", "again", "--config", str(config)], Exception,
           "is failed: only a queued, started or unsigned slide can be cancelled")
    # A counted slide from the wrong glass: cancelled before anyone signs (and reports) it.
    res = runner.invoke(app, ["cancel", "BM-A", "--reason", "wrong glass on the stage",
                              "--config", str(config)])
    assert res.exit_code == 0 and "was awaiting_review" in res.output, res.output
    assert runner.invoke(app, ["submit", str(scope), "--name", "BM-D", "--config",
                               str(config)]).exit_code == 0
    from daemon.service import daemon_lock

    with Store(f"sqlite:///{tmp_path / 'q.db'}", tmp_path / "data") as store:
        b = store.slide("BM-B")
        assert b.status == "failed" and b.error.endswith(": slide broken on the stage")
        assert "tech.anna" in b.error, b.error
        store.claim(store.slide("BM-D").id, "scope-1")
        running = daemon_lock(store.data_dir, "scope-1")  # its daemon counts or retries it
    _fails(["cancel", "BM-D", "--reason", "x", "--config", str(config)], Exception,
           "is with the running daemon of 'scope-1'")
    running.close()  # the daemon stopped (or was killed) with the slide started
    assert runner.invoke(app, ["cancel", "BM-D", "--reason", "glass taken off",
                               "--config", str(config)]).exit_code == 0


def test_a_microscope_that_will_not_open_waits_and_exit_when_idle_ends(tmp_path):
    """A .cfg whose adapter does not load: the slide waits (not failed: the glass is still on
    the stage), told once; `--exit-when-idle` returns once the fault has persisted through a
    retry instead of waiting for ever."""
    from daemon.store import Store
    from tests.daemon_fixtures import run_in_process

    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'q.db'}")
    scope = tmp_path / "scope.cfg"
    scope.write_text("Device,Camera,DemoCamera,DCam\nProperty,Core,Initialize,1\n")
    assert runner.invoke(app, ["submit", str(scope), "--name", "BM-A", "--um-per-px", "0.072",
                               "--config", str(config)]).exit_code == 0
    paused = []
    run_in_process(config, on_event=lambda e: paused.append(e) if e.kind == "slide_paused"
                   else None)
    assert len(paused) >= 2 and [e.data.get("notify", True) for e in paused][:1] == [True]
    with Store(f"sqlite:///{tmp_path / 'q.db'}", tmp_path / "data") as store:
        s = store.slide("BM-A")
        assert s.status == "acquiring" and s.error.startswith(
            "microscope not ready: ") and "DemoCamera" in s.error


def test_submit_needs_a_pixel_size_the_daemon_can_use(tmp_path):
    from daemon.store import Store

    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'q.db'}")
    jpeg = BCCD / "JPEGImages" / "BloodImage_00000.jpg"  # a plain image: no pixel size in it
    _fails(["submit", str(jpeg), "--config", str(config)], Exception,
           "the file states no pixel size; give --um-per-px")
    _fails(["submit", str(jpeg), "--um-per-px", "72", "--config", str(config)], ImageError,
           "--um-per-px 72 µm per pixel is coarser than any microscope image")
    # Coarser than the detector can search: every field would be refused, 0 cells counted.
    _fails(["submit", str(jpeg), "--um-per-px", "1.5", "--config", str(config)], ImageError,
           "too coarse to detect leukocytes")
    res = runner.invoke(app, ["submit", str(jpeg), "--um-per-px", "0.072", "--name", "J1",
                              "--config", str(config)])
    assert res.exit_code == 0, res.output
    # The stated size overrides a size in the file too.
    slide = bccd_slide_file(tmp_path, cols=2, rows=1)
    res = runner.invoke(app, ["submit", str(slide), "--um-per-px", "0.08", "--name", "T1",
                              "--config", str(config)])
    assert res.exit_code == 0, res.output
    store = Store(f"sqlite:///{tmp_path / 'q.db'}", tmp_path / "data")
    try:
        assert [(s.name, s.um_per_px) for s in store.slides(None)] == [("J1", 0.072),
                                                                       ("T1", 0.08)]
    finally:
        store.close()


@pytest.mark.slow
def test_sighup_reloads_config_and_a_second_daemon_is_refused(tmp_path):
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'hup.db'}")
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log)
    try:
        wait_for_log(log, '"daemon started"', proc)
        second = subprocess.run([*DAEMON, "daemon", "--config", str(config)], cwd=REPO,
                                env=daemon_env(), capture_output=True, text=True, timeout=120)
        assert second.returncode == 2 and "another marrowcount daemon" in second.stderr
        text = config.read_text().replace("poll_seconds: 0.1", "poll_seconds: 0.2")
        config.write_text(text)
        proc.send_signal(signal.SIGHUP)
        wait_for_log(log, '"config reloaded"', proc)
        config.write_text("service: [broken\n")
        proc.send_signal(signal.SIGHUP)
        wait_for_log(log, "config reload failed; keeping the running config", proc)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            kill9(proc)


def test_reading_commands_never_make_a_store_at_a_wrong_path(tmp_path):
    missing = tmp_path / "typo" / "q.db"
    config = daemon_config(tmp_path, f"sqlite:///{missing}")
    for args in (["status"], ["report", "BM-17"], ["agreement"], ["user", "list"],
                 ["purge-images", "--older-than-days", "90"]):
        _fails([*args, "--config", str(config)], StoreError, f"no store at {missing}")
    assert not missing.exists()
    # Submitting is how a store begins: it is made then, and a wrong name says which store.
    slide = bccd_slide_file(tmp_path, cols=2, rows=1)
    assert runner.invoke(app, ["submit", str(slide), "--config", str(config)]).exit_code == 0
    _fails(["report", "BM-17", "--config", str(config)], StoreError,
           f"no slide 'BM-17' in the store sqlite:///{missing}")


@pytest.mark.timeout(120)  # the old live display printed nothing to a pipe: never hang on it
def test_status_watch_piped_to_a_log_prints_as_it_goes(tmp_path):
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'q.db'}")
    jpeg = BCCD / "JPEGImages" / "BloodImage_00000.jpg"
    assert runner.invoke(app, ["submit", str(jpeg), "--um-per-px", "0.072", "--name", "P1",
                               "--config", str(config)]).exit_code == 0
    proc = subprocess.Popen([*DAEMON, "status", "--watch", "--config", str(config)], cwd=REPO,
                            env=daemon_env(), stdout=subprocess.PIPE, text=True)
    try:
        # A live display on a pipe showed nothing until it ended; each view now arrives whole.
        lines = []
        while not any("in the queue" in line for line in lines):
            line = proc.stdout.readline()
            assert line, "status --watch ended without printing the queue"
            lines.append(line)
        assert lines[0].startswith("-- ") and any("P1 (queued)" in line for line in lines)
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_sighup_reaches_the_folder_watcher(tmp_path):
    """A reloaded target applies to the next file dropped in a watched folder (the watcher
    was built once at start and kept the old one until a restart)."""
    import time

    from daemon.config import load_config
    from daemon.service import Service

    inbox = tmp_path / "scan"
    inbox.mkdir()
    slide = bccd_slide_file(tmp_path, cols=2, rows=1)
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'w.db'}", target=300, extra={
        "watch": {"folders": [str(inbox)], "stable_seconds": 0.2, "scan_seconds": 0.2}})
    svc = Service(load_config(config), config)
    try:
        svc._watcher = first = svc._start_watcher()  # as run() does
        svc._reload_config()  # nothing changed: the same watcher goes on
        assert svc._watcher is first
        config.write_text(config.read_text().replace("target: 300", "target: 100"))
        svc._on_hup()
        svc._reload_config()  # what the loop does after SIGHUP
        assert svc._watcher is not first and svc.cfg.acquisition.target == 100
        shutil.copy(slide, inbox / "BM-1.tif")
        deadline = time.monotonic() + 60
        while not svc.store.slides(None) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [(s.name, s.target) for s in svc.store.slides(None)] == [("BM-1.tif", 100)]
    finally:
        if svc._watcher is not None:
            svc._watcher.stop()
        svc.close()


def test_every_stderr_line_is_json_and_pymmcore_keeps_no_log_file(tmp_path):
    """Libraries' warnings (tifffile on a truncated slide file, pymmcore-plus) come out as
    the service's JSON lines, and pymmcore-plus writes no log file of its own in the home
    (under systemd: the state directory, up to 800 MB nobody looks at)."""
    truncated = tmp_path / "cut.tif"
    full = bccd_slide_file(tmp_path, cols=2, rows=1).read_bytes()
    truncated.write_bytes(full[: len(full) // 2])
    script = (
        "import logging, tifffile\n"
        "from daemon.service import setup_logging\n"
        "setup_logging('json', 'info')\n"
        "import drivers.virtual\n"  # the module that imports pymmcore-plus alone
        "assert not logging.getLogger('pymmcore-plus').handlers\n"
        "logging.getLogger('pymmcore-plus').warning('MDA Canceled: stage_positions=(...)')\n"
        f"with tifffile.TiffFile({str(truncated)!r}) as t:\n"
        "    t.series\n"
    )
    env = {**daemon_env(), "HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # fails on any line that is not JSON
    loggers = {r["logger"] for r in records}
    assert {"pymmcore-plus", "tifffile"} <= loggers, proc.stderr
    assert not (tmp_path / "home" / ".local" / "share" / "pymmcore-plus").exists()


def test_text_log_lines_keep_the_slide_and_counts():
    """`service.log_format: text` keeps what a JSON line carries: "field committed" alone did
    not say which slide, field or count."""
    import io
    import logging

    from daemon.service import setup_logging

    loggers = [logging.getLogger(n) for n in ("", "marrowcount", "drivers", "pipeline")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    out = io.StringIO()
    setup_logging("text", "info", stream=out)
    try:
        logging.getLogger("marrowcount.service").info(
            "field committed", extra={"data": {"slide": 3, "field": 12, "counted": 240}})
    finally:  # the test runner's own capture comes back
        logging.captureWarnings(False)
        for lg, handlers, level, propagate in saved:
            lg.handlers[:], lg.level, lg.propagate = handlers, level, propagate
    assert out.getvalue().rstrip().endswith("field committed slide=3 field=12 counted=240")
