"""A watcher killed (SIGKILL) in the middle of its backlog: the next run loses and repeats nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import func, select

from daemon.models import ScannedFile
from daemon.store import Store
from drivers.folder import FolderWatcher, WatchParams
from tests.conftest import BCCD_UM_PER_PX, REPO
from tests.slide_fixtures import bccd_field

N_FILES = 24

CHILD = """
import sys, time
from daemon.config import load_config
from daemon.store import Store
from drivers.folder import FolderWatcher, WatchParams
cfg = load_config()
inbox, db, data = sys.argv[1:4]
params = WatchParams(**{**cfg.watch.model_dump(), "stable_seconds": 0.0, "scan_seconds": 0.05,
                        "folders": [{"path": inbox, "um_per_px": %r}]})
w = FolderWatcher(params, Store(db, data), target=cfg.acquisition.target, taxonomy=cfg.taxonomy,
                  detect=cfg.detect)
while True:
    w.scan_once()
    time.sleep(0.01)
""" % BCCD_UM_PER_PX


def test_kill_mid_backlog_then_restart(config, tmp_path):
    inbox = tmp_path / "scanner"
    inbox.mkdir()
    for i in range(N_FILES):
        shutil.copy(bccd_field(i), inbox / f"s{i:02d}.jpg")
    db, data = f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "data"
    Store(db, data).close()  # migrate before the child starts
    store = Store(db, data)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(inbox), db, str(data)], cwd=REPO,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(store.slides()) >= N_FILES // 3:
                break
            assert child.poll() is None, "watcher child died"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    before = len(store.slides())
    assert 0 < before < N_FILES, "the kill must land mid-backlog"

    params = WatchParams(**{**config.watch.model_dump(), "stable_seconds": 0.0,
                            "folders": [{"path": str(inbox), "um_per_px": BCCD_UM_PER_PX}]})
    w = FolderWatcher(params, store, target=config.acquisition.target, taxonomy=config.taxonomy,
                      detect=config.detect)
    for _ in range(5):
        w.scan_once()
    slides = store.slides()
    assert sorted(s.name for s in slides) == [f"s{i:02d}.jpg" for i in range(N_FILES)]
    with store.session() as s:
        states = dict(s.execute(select(ScannedFile.state, func.count()).group_by(ScannedFile.state)).all())
        linked = s.scalar(select(func.count(func.distinct(ScannedFile.slide_id))))
    assert states == {"processing": N_FILES} and linked == N_FILES
    for sl in slides:
        assert Path(sl.plan["files"][0]["path"]).name == sl.name
    store.close()
