"""marrowcount user add / user list / review, run as a user would."""

from __future__ import annotations

import getpass
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from sqlalchemy import select

from daemon.cli import main
from daemon.models import AuditEvent, User
from daemon.store import Store


def _run(monkeypatch, args: list[str], stdin: str = "") -> int:
    monkeypatch.setattr(sys, "argv", ["marrowcount", *args])
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code or 0


@pytest.fixture
def where(tmp_path) -> list[str]:
    return ["--db", f"sqlite:///{tmp_path / 'store.db'}", "--data-dir", str(tmp_path / "data")]


def test_user_add_hashes_the_password_and_refuses_bad_input(monkeypatch, capsys, tmp_path, where):
    assert _run(monkeypatch, ["user", "add", "alice", "--role", "supervisor",
                              "--password-stdin", *where], "correct horse battery\n") == 0
    assert "alice" in capsys.readouterr().out
    store = Store(f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "data")
    with store.session() as s:
        user = s.scalars(select(User)).one()
        assert (user.username, user.role, user.active) == ("alice", "supervisor", True)
        assert user.password_hash.startswith("$argon2id$")
        assert "correct horse" not in user.password_hash
    store.close()

    for args, stdin, message in [
        (["alice", "--role", "technician"], "another password\n", "already exists"),
        (["bob", "--role", "admin"], "another password\n", "--role must be one of"),
        (["bob", "--role", "technician"], "short\n", "at least 8 characters"),
        (["bad name", "--role", "technician"], "long enough pw\n", "no spaces"),
        # Names that read as alice's, or as another's through a lookalike letter.
        (["Alice", "--role", "technician"], "long enough pw\n",
         "'alice' already exists; 'Alice' would read as the same"),
        (["\u0455uper", "--role", "supervisor"], "long enough pw\n", "ASCII letters"),
    ]:
        code = _run(monkeypatch, ["user", "add", *args, "--password-stdin", *where], stdin)
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, (args, err)

    assert _run(monkeypatch, ["user", "list", *where]) == 0
    out = capsys.readouterr().out
    assert "alice" in out and "supervisor" in out and "bob" not in out


def test_user_passwd_and_disable(monkeypatch, capsys, tmp_path, where):
    from daemon.review.auth import authenticate

    assert _run(monkeypatch, ["user", "add", "carol", "--role", "technician",
                              "--password-stdin", *where], "first password\n") == 0
    assert _run(monkeypatch, ["user", "passwd", "carol", "--password-stdin", *where],
                "second password\n") == 0
    assert _run(monkeypatch, ["user", "passwd", "carol", "--password-stdin", *where],
                "short\n") == 2
    assert _run(monkeypatch, ["user", "disable", "nobody", *where]) == 2
    assert "no user 'nobody'" in capsys.readouterr().err
    store = Store(f"sqlite:///{tmp_path / 'store.db'}", tmp_path / "data")
    try:
        with store.session() as s:
            assert authenticate(s, "carol", "first password") is None
            assert authenticate(s, "carol", "second password") is not None
        assert _run(monkeypatch, ["user", "disable", "carol", *where]) == 0
        with store.session() as s:
            assert authenticate(s, "carol", "second password") is None
        assert _run(monkeypatch, ["user", "disable", "carol", "--enable", *where]) == 0
        with store.session() as s:
            assert authenticate(s, "carol", "second password") is not None
        assert _run(monkeypatch, ["user", "list", *where]) == 0
        # Every account change is in the audit trail, under the person behind sudo.
        with store.session() as s:
            events = [(e.username, e.action, (e.after or {}).get("user")) for e in s.scalars(
                select(AuditEvent).where(AuditEvent.slide_id.is_(None)).order_by(AuditEvent.id))]
        me = os.environ.get("SUDO_USER") or getpass.getuser()
        assert events == [(me, "user_add", "carol"), (me, "user_password", "carol"),
                          (me, "user_disable", "carol"), (me, "user_enable", "carol")]
        capsys.readouterr()
        assert _run(monkeypatch, ["audit", "--accounts", "--json", *where]) == 0
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        assert [(x["action"], x["after"]["user"]) for x in lines] == [
            (a, u) for _, a, u in events] and all(x["at"].endswith("+00:00") for x in lines)
    finally:
        store.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_review_serves_on_localhost(tmp_path, where):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", "from daemon.cli import main; main()", "review", *where,
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/login", timeout=5)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode()[-2000:]
                    pytest.fail(f"review app did not come up: {out}")
                time.sleep(0.5)
        assert r.status_code == 200 and 'name="csrf_token"' in r.text
        assert httpx.get(f"http://127.0.0.1:{port}/", follow_redirects=False).status_code == 303
        # Bound to the loopback address only (patient data): the kernel's listening sockets.
        rows = [line.split() for line in open("/proc/net/tcp").read().splitlines()[1:]]
        mine = [r[1] for r in rows if r[3] == "0A" and r[1].endswith(f":{port:04X}")]
        assert mine == [f"0100007F:{port:04X}"], mine
        assert (tmp_path / "data" / "review_secret").stat().st_mode & 0o077 == 0
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
