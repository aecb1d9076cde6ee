"""The daemon end to end on the virtual microscope over real BCCD fields: an uninterrupted
run, the kill -9 crash test, SIGTERM with metrics and sd_notify, and a full disk."""

from __future__ import annotations

import errno
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from daemon.config import load_config
from daemon.service import Service, submit_slide
from daemon.store import Store, write_file
from tests.daemon_fixtures import (
    bccd_slide_file,
    daemon_config,
    daemon_env,
    free_port,
    kill9,
    referenced_files,
    snapshot,
    start_daemon,
    stored_files,
    wait_for_log,
)
from tests.daemon_fixtures import DAEMON  # noqa: F401

pytestmark = pytest.mark.slow


def _submit(config: Path, slide: Path) -> None:
    cfg = load_config(config)
    with Store.from_params(cfg.store, cfg.resolve) as store:
        submit_slide(store, cfg, slide, name="BCCD-mosaic")


def _open(config: Path) -> Store:
    cfg = load_config(config)
    return Store.from_params(cfg.store, cfg.resolve)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    return bccd_slide_file(tmp_path_factory.mktemp("slide"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, slide) -> dict:
    """The slide counted in one uninterrupted daemon run."""
    tmp = tmp_path_factory.mktemp("reference")
    config = daemon_config(tmp, f"sqlite:///{tmp / 'ref.db'}")
    _submit(config, slide)
    proc = start_daemon(config, tmp / "daemon.log", "--exit-when-idle")
    assert proc.wait(timeout=600) == 0, (tmp / "daemon.log").read_text()[-3000:]
    with _open(config) as store:
        snap = snapshot(store)
        assert stored_files(tmp / "data") == referenced_files(store)
    assert snap["status"] == "awaiting_review" and snap["stopped_because"] == "area_exhausted"
    assert snap["fields"] == list(range(15))  # every field of the 5 × 3 mosaic, once
    assert snap["progress"].counted > 0
    return snap


def _sleep_in_start_up(log: Path, after: int, seconds: float) -> None:
    """Sleep ``seconds``, or until this run commits its first field if that comes sooner: a
    start-up kill stays in start-up however fast the machine analyses fields."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if '"field committed"' in log.read_text(errors="replace")[after:]:
            return
        time.sleep(0.01)


def test_kill_9_at_random_points_never_loses_or_doubles_a_cell(tmp_path, slide, reference):
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'crash.db'}")
    _submit(config, slide)
    log = tmp_path / "daemon.log"
    rng = random.Random(20261126)
    n_fields = len(reference["fields"])
    # Seven kills just after chosen fields' commits (during the next field's analysis, crop
    # writing or commit) and three anywhere in start-up, in random order. Kill points are
    # chosen by field, not by time, so a fast machine cannot finish the slide early.
    after_field = sorted(rng.sample(range(n_fields - 4), 7))
    plan = ["start-up"] * 3 + ["after a field"] * 7
    rng.shuffle(plan)
    mid_count = 0
    for kind in plan:
        offset = log.stat().st_size if log.exists() else 0
        proc = start_daemon(config, log)
        wait_for_log(log, '"daemon started"', proc, after=offset)
        with _open(config) as store:
            committed = store.progress(store.slide("BCCD-mosaic").id).n_fields
        if kind == "start-up" or committed >= n_fields - 3:
            # Anywhere in start-up: opening the slide, planning, the first field.
            _sleep_in_start_up(log, offset, rng.uniform(0.0, 0.5))
        else:
            target = max(after_field.pop(0), committed)
            wait_for_log(log, f'"field": {target},', proc, after=offset)
            time.sleep(rng.uniform(0.0, 0.1))
        assert proc.poll() is None, log.read_text()[-3000:]
        kill9(proc)
        with _open(config) as store:
            n = store.progress(store.slide("BCCD-mosaic").id).n_fields
        mid_count += 0 < n < n_fields
    assert mid_count >= 5  # most kills landed while the slide was being counted
    proc = start_daemon(config, log, "--exit-when-idle")
    assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    assert log.read_text().count('"slide resumed"') >= 5
    with _open(config) as store:
        snap = snapshot(store)
        assert snap == reference  # same fields, same cells, same counts, same ending
        assert stored_files(tmp_path / "data") == referenced_files(store)  # no orphan crops
    assert not any((tmp_path / "data" / ".staging").iterdir())


def test_sigterm_finishes_the_field_and_resume_completes(tmp_path, slide, reference):
    port = free_port()
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'term.db'}", metrics_port=port)
    _submit(config, slide)
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    env = {**daemon_env(), "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "3000000"}
    log = tmp_path / "daemon.log"
    proc = start_daemon(config, log, env=env)
    try:
        wait_for_log(log, '"field committed"', proc)
        wait_for_log(log, '"field": 2,', proc)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            kill9(proc)
    text = metrics.decode()
    fields_total = float(next(ln.split()[-1] for ln in text.splitlines()
                              if ln.startswith("marrowcount_fields_total")))
    assert fields_total >= 3
    assert "marrowcount_queue_length" in text and "marrowcount_cells_per_second" in text
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except (TimeoutError, socket.timeout):
            break
    sock.close()
    joined = "\n".join(messages)
    assert messages[0].startswith("READY=1")
    assert "STATUS=BCCD-mosaic: " in joined and " cells, field " in joined
    assert "WATCHDOG=1" in joined and "STOPPING=1" in joined
    out = log.read_text()
    assert '"daemon stopped"' in out and '"slide interrupted; it resumes at the next start"' in out
    with _open(config) as store:
        sid = store.slide("BCCD-mosaic").id
        assert store.slide(sid).status == "acquiring"
        stopped_at = store.progress(sid).n_fields
        assert 3 <= stopped_at < len(reference["fields"])
    proc = start_daemon(config, log, "--exit-when-idle")
    assert proc.wait(timeout=600) == 0
    with _open(config) as store:
        assert snapshot(store) == reference


def test_full_disk_marks_field_failed_then_retries(tmp_path, slide, reference):
    """ENOSPC while a field's crops are written: that field is rolled back and noted on the
    slide, the slide pauses and resumes, and the end result equals the reference."""
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'full.db'}",
                           commit_retries=1, retry_slide_after_s=1.0)
    cfg = load_config(config)
    attempts: set[str] = set()
    lock = threading.Lock()

    def disk(path: Path, data: bytes) -> None:
        # The disk is full for the first three attempts at committing the first slide's field
        # 4 (each attempt writes into its own staging folder), then space is freed.
        with lock:
            if path.parent.name.startswith("s1-f4-"):
                attempts.add(path.parent.name)
            full = path.parent.name.startswith("s1-f4-") and len(attempts) <= 3
        if full:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_file(path, data)

    store = Store(f"sqlite:///{tmp_path / 'full.db'}", tmp_path / "data", writer=disk)
    submit_slide(store, cfg, slide, name="BCCD-mosaic")
    # A second slide waits behind it: a full disk would fail its fields alike, so it is
    # not claimed while the first one waits for space.
    second = submit_slide(store, cfg, slide, name="next-in-queue", target=10)
    events = []
    svc = Service(cfg, config, on_event=events.append, store=store)
    try:
        svc.run(exit_when_idle=True)
        started = [e.name for e in events if e.kind == "slide_started"]
        assert started == ["BCCD-mosaic", "BCCD-mosaic", "next-in-queue"]
        assert store.slide(second).status == "awaiting_review"
        events = [e for e in events if e.name == "BCCD-mosaic"]
        paused = [e for e in events if e.kind == "slide_paused"]
        # commit_retries=1: attempts 1 and 2 fail, the slide pauses and resumes from field 4,
        # attempt 3 fails, attempt 4 (the retry) commits.
        assert len(attempts) == 4 and len(paused) == 1
        assert paused[0].data["reason"] == ("field 4 failed: No space left on device (data "
                                            f"folder {tmp_path / 'data'})")
        snap = snapshot(store)
        assert snap == reference
        assert store.slide("BCCD-mosaic").error is None  # cleared once fields commit again
        assert stored_files(tmp_path / "data") == referenced_files(store)
    finally:
        svc.close()


def test_a_held_queue_goes_on_when_the_slide_that_held_it_fails(tmp_path, slide):
    """The full disk holds the queue behind the slide that met it; that slide's retry then
    fails without a commit (its file went): the queue had waited until a restart."""
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'held.db'}",
                           commit_retries=0, retry_slide_after_s=0.5)
    cfg = load_config(config)
    doomed = tmp_path / "doomed.tif"
    shutil.copy(slide, doomed)

    def disk(path: Path, data: bytes) -> None:
        if path.parent.name.startswith("s1-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        write_file(path, data)

    store = Store(f"sqlite:///{tmp_path / 'held.db'}", tmp_path / "data", writer=disk)
    first = submit_slide(store, cfg, doomed, name="doomed")
    second = submit_slide(store, cfg, slide, name="next-in-queue", target=10)
    events = []

    def on_event(e):
        events.append(e)
        if e.kind == "slide_paused":
            doomed.unlink(missing_ok=True)

    svc = Service(cfg, config, on_event=on_event, store=store)
    try:
        svc.run(exit_when_idle=True)
        assert store.slide(first).status == "failed"
        assert "no such file" in store.slide(first).error.lower()
        assert store.slide(second).status == "awaiting_review"
        started = [e.name for e in events if e.kind == "slide_started"]
        assert started == ["doomed", "doomed", "next-in-queue"]
    finally:
        svc.close()
