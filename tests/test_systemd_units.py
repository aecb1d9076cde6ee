"""The shipped systemd units: the daemon is Type=notify with a watchdog, both run as the
dedicated user with the hardening options, and each ExecStart parses as a real marrowcount
command line (options that exist), without running it."""

from __future__ import annotations

import configparser
import shlex

import pytest
import typer.main

from daemon.cli import app
from tests.conftest import REPO

UNITS = sorted((REPO / "systemd").glob("*.service"))
HARDENING = {"NoNewPrivileges": "yes", "PrivateTmp": "yes", "ProtectSystem": "strict",
             "ProtectHome": "yes", "User": "marrowcount", "ReadWritePaths": "/var/lib/marrowcount"}


def _service(path) -> configparser.SectionProxy:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(path, encoding="utf-8")
    return unit["Service"]


def test_the_units_are_shipped():
    assert [u.name for u in UNITS] == ["marrowcount-backup.service", "marrowcount-export.service",
                                       "marrowcount-purge.service", "marrowcount-review.service",
                                       "marrowcount.service"]


@pytest.mark.parametrize("path", UNITS, ids=lambda p: p.name)
def test_unit_is_hardened_and_its_command_line_parses(path):
    svc = _service(path)
    for key, value in HARDENING.items():
        got = svc.get(key, "")
        if key == "ReadWritePaths":  # the state directory first; the backup adds its folder
            got = got.split()[0]
        assert got == value, (path.name, key)
    argv = shlex.split(svc["ExecStart"])
    assert argv[0].endswith("/.venv/bin/marrowcount")
    group = typer.main.get_command(app)
    ctx = group.make_context("marrowcount", argv[1:])
    sub = group.get_command(ctx, argv[1])
    assert sub is not None, argv
    sub.make_context(argv[1], argv[2:], parent=ctx)  # raises on an unknown option


def test_daemon_unit_notifies_and_is_watched():
    svc = _service(REPO / "systemd" / "marrowcount.service")
    assert svc["Type"] == "notify" and int(svc["WatchdogSec"]) > 0
    assert svc["Restart"] == "on-failure" and svc["KillSignal"] == "SIGTERM"
    assert "daemon" in shlex.split(svc["ExecStart"])


def _timed(name: str) -> list[str]:
    """The command line of ``name``.service, after checking that ``name``.timer runs it daily
    and makes up a missed run."""
    timer = configparser.ConfigParser(interpolation=None, strict=True)
    timer.optionxform = str
    timer.read(REPO / "systemd" / f"{name}.timer", encoding="utf-8")
    assert timer["Timer"]["Unit"] == f"{name}.service"
    assert timer["Timer"]["OnCalendar"].startswith("*-*-* ")
    assert timer["Timer"]["Persistent"] == "true" and timer["Install"]["WantedBy"] == "timers.target"
    svc = _service(REPO / "systemd" / f"{name}.service")
    assert svc["Type"] == "oneshot"
    return shlex.split(svc["ExecStart"])


def test_purge_runs_daily_from_its_timer():
    argv = _timed("marrowcount-purge")
    assert argv[1] == "purge-images"
    assert "--dry-run" not in argv and int(argv[argv.index("--older-than-days") + 1]) >= 1


def test_backup_runs_nightly_into_a_folder_it_may_write():
    argv = _timed("marrowcount-backup")
    assert argv[1] == "backup"
    dest = argv[2]
    assert dest in _service(REPO / "systemd" / "marrowcount-backup.service")[
        "ReadWritePaths"].split()
    assert not dest.startswith("/var/lib/marrowcount")  # not beside the store it backs up


def test_export_retries_every_quarter_hour_into_the_folder_the_config_names():
    import yaml

    argv = _timed("marrowcount-export")
    assert argv[1] == "export-reports"
    folder = yaml.safe_load((REPO / "systemd" / "marrowcount.yaml").read_text())[
        "review"]["export_dir"]
    for unit in ("marrowcount-export.service", "marrowcount-review.service"):
        writable = [p.lstrip("-") for p in _service(REPO / "systemd" / unit)[
            "ReadWritePaths"].split()]
        assert folder in writable, unit  # else the hardened unit cannot write the LIS folder


def test_an_idle_wait_longer_than_the_watchdog_still_pings(tmp_path, monkeypatch):
    """poll_seconds (or a commit back-off) longer than the watchdog interval: the wait pings
    on time (the idle daemon had pinged every poll_seconds and systemd killed it)."""
    import socket
    import threading
    import time

    from daemon.notify import Notifier

    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.1)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")  # systemd's limit 3 s: a ping each second
    n = Notifier()
    assert n.ping_every == 1.0
    t0 = time.monotonic()
    assert n.wait(threading.Event(), 3.5) is False  # one poll of 3.5 s
    pings = []
    while True:
        try:
            msg = sock.recv(1024).decode()
        except TimeoutError:
            break
        pings += [time.monotonic() - t0] if "WATCHDOG=1" in msg else []
    sock.close()
    assert len(pings) >= 3
    woken = threading.Event()
    threading.Timer(0.2, woken.set).start()
    got = []
    waiter = threading.Thread(target=lambda: got.append(n.wait(woken, 600.0)))
    waiter.start()
    waiter.join(60)  # woken, not run out
    assert got == [True]
