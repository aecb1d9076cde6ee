"""Review app security over HTTP: sessions, CSRF, roles, images by id only, cookies."""

from __future__ import annotations

import re
import time

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from daemon.models import AuditEvent, Cell, Field, Slide, User
from daemon.review import actions
from daemon.review.app import create_app
from daemon.review.auth import SESSION_COOKIE
from tests.review_slide import (  # noqa: F401  (fixtures)
    SUPER,
    TECH,
    TECH2,
    check_flags,
    csrf_of,
    login,
    pipeline_fields,
    review_env,
    review_template,
    seen_of,
    sign_form,
)


@pytest.fixture
def app(review_env):  # noqa: F811
    return create_app(review_env.cfg, review_env.store)


def _ids(env) -> dict[str, int]:
    with env.store.session() as s:
        cell = s.scalar(select(Cell.id).where(Cell.slide_id == env.slide_id,
                                              Cell.duplicate_of.is_(None)).limit(1))
        fld = s.scalar(select(Field.id).where(Field.slide_id == env.slide_id).limit(1))
    return {"slide_id": env.slide_id, "cell_id": cell, "field_id": fld, "fmt": "pdf"}


def _audit_count(env) -> int:
    with env.store.session() as s:
        return s.scalar(select(func.count()).select_from(AuditEvent)
                        .where(AuditEvent.slide_id.is_not(None)))  # not logins


def _routes(app):
    for r in app.routes:
        if isinstance(r, APIRoute):
            for method in sorted(r.methods - {"HEAD"}):
                yield method, r.path


def test_every_route_without_a_session_is_refused_or_redirected(app, review_env):
    ids = _ids(review_env)
    client = TestClient(app)
    seen = 0
    for method, path in _routes(app):
        if path in ("/login", "/favicon.ico"):  # public: the form, and an empty icon
            continue
        url = path.format(**ids)
        r = client.request(method, url, json={}, follow_redirects=False)
        if not url.startswith(("/api/", "/images/")):
            # Pages, and forms sent after the session ended: to the login page, then back.
            assert r.status_code == 303, (method, url, r.status_code)
            assert r.headers["location"].startswith("/login?next=")
        else:
            assert r.status_code in (401, 403), (method, url, r.status_code)
        assert "cells" not in r.text or r.status_code == 303
        seen += 1
    assert seen >= 15
    # A forged or tampered cookie is no session either.
    client.cookies.set(SESSION_COOKIE, "eyJ1aWQiOjF9.forged.sig")
    assert client.get(f"/slides/{ids['slide_id']}", follow_redirects=False).status_code == 303
    assert client.get(f"/images/cells/{ids['cell_id']}").status_code == 401
    # The login page itself and the static files are public.
    assert TestClient(app).get("/login").status_code == 200
    assert TestClient(app).get("/static/review.css").status_code == 200


def test_login_sets_a_hardened_cookie_and_rejects_wrong_passwords(app, review_env):
    client = TestClient(app)
    page = client.get("/login")
    r = client.post("/login", data={"username": TECH[0], "password": "wrong-password",
                                    "csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 401 and "Wrong user name or password" in r.text
    r = client.post("/login", data={"username": "nobody", "password": TECH[1],
                                    "csrf_token": csrf_of(page.text)}, follow_redirects=False)
    assert r.status_code == 401
    # Logging in without the login form's CSRF token is refused even with the right password.
    r = TestClient(app).post("/login", data={"username": TECH[0], "password": TECH[1]},
                             follow_redirects=False)
    assert r.status_code == 403
    r = client.post("/login", data={"username": TECH[0], "password": TECH[1],
                                    "csrf_token": csrf_of(page.text), "next": "//evil.example/x"},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"  # no open redirect
    cookie = r.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    # A fresh CSRF token after login: the pre-login token no longer works.
    assert csrf_of(client.get("/").text) != csrf_of(page.text)
    headers = client.get("/").headers
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    assert headers["cache-control"] == "no-store"


def test_repeated_failures_lock_the_name_for_a_while(app, review_env):
    client = TestClient(app)
    token = csrf_of(client.get("/login").text)
    for _ in range(5):
        r = client.post("/login", data={"username": TECH2[0], "password": "nope-nope",
                                        "csrf_token": token}, follow_redirects=False)
        assert r.status_code == 401
    r = client.post("/login", data={"username": TECH2[0], "password": TECH2[1],
                                    "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 429  # even the right password, until the window passes
    assert f"Too many failed attempts for {TECH2[0]}: try again in" in r.text
    r = client.post("/login", data={"username": TECH[0], "password": TECH[1],
                                    "csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303  # other accounts are unaffected
    # The same name with spaces around it is the same account, locked too (each spelling
    # had had a counter of its own: guessing never paused).
    other = TestClient(app)
    token = csrf_of(other.get("/login").text)
    for name in (f" {TECH2[0]}", f"{TECH2[0]}\t", f"\u3000{TECH2[0]}"):
        r = other.post("/login", data={"username": name, "password": TECH2[1],
                                       "csrf_token": token}, follow_redirects=False)
        assert r.status_code == 429, name
    # Every wrong password is in the audit trail with where it came from; the one that
    # started the pause says so. The refusals during the pause checked nothing: log only.
    with review_env.store.session() as s:
        failed = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "login_failed")
                                .order_by(AuditEvent.id)))
        logins = list(s.scalars(select(AuditEvent).where(AuditEvent.action == "login")))
    assert [e.username for e in failed] == [TECH2[0]] * 5
    assert [bool(e.after.get("paused")) for e in failed] == [False] * 4 + [True]
    assert {e.after["client"] for e in failed} == {"testclient"}
    assert [(e.username, e.after) for e in logins] == [(TECH[0], {"client": "testclient"})]


def test_attempts_sent_at_once_get_no_more_tries_than_one_by_one(app):
    """Each attempt is counted before its password is checked: a burst of parallel guesses
    had each passed the lockout test before any failure was counted."""
    import threading

    import daemon.review.app as review_app

    first = TestClient(app)
    token = csrf_of(first.get("/login").text)
    clients = []
    for _ in range(16):
        c = TestClient(app)
        c.cookies.update(first.cookies)  # one pre-login session, sent from many sockets
        clients.append(c)
    start, codes = threading.Barrier(len(clients)), []

    def guess(c):
        start.wait()
        codes.append(c.post("/login", data={"username": TECH2[0], "password": "nope-nope",
                                            "csrf_token": token}, follow_redirects=False
                            ).status_code)

    threads = [threading.Thread(target=guess, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(codes) == ([401] * review_app.LOGIN_MAX_FAILURES
                             + [429] * (len(clients) - review_app.LOGIN_MAX_FAILURES))


def test_attempts_during_a_lockout_do_not_extend_it(app, monkeypatch):
    import types

    import daemon.review.app as review_app

    clock = [1000.0]
    monkeypatch.setattr(review_app, "time", types.SimpleNamespace(monotonic=lambda: clock[0],
                                                                  time=time.time))
    client = TestClient(app)
    token = csrf_of(client.get("/login").text)

    def attempt(password):
        return client.post("/login", data={"username": TECH2[0], "password": password,
                                           "csrf_token": token}, follow_redirects=False)

    for _ in range(review_app.LOGIN_MAX_FAILURES):
        assert attempt("nope-nope").status_code == 401
    for _ in range(20):  # someone keeps trying through the pause
        clock[0] += review_app.LOGIN_WINDOW_S / 25
        assert attempt("nope-nope").status_code == 429
    clock[0] = 1000.0 + review_app.LOGIN_WINDOW_S + 1  # the pause from the first failures ends
    assert attempt(TECH2[1]).status_code == 303


@pytest.mark.parametrize("target", ["//evil.example/x", "/\t/evil.example/x",
                                    "/\r\n/evil.example/x", "/\\evil.example/x",
                                    "https://evil.example/x"])
def test_login_sends_nobody_to_another_site(app, review_env, target):
    """Browsers drop tabs and line breaks from a Location: "/<tab>/evil.example" had been
    let through as local, and is "//evil.example", another site, to a browser."""
    client = TestClient(app)
    page = client.get("/login", params={"next": target})
    assert 'name="next" value="/"' in page.text
    r = client.post("/login", data={"username": TECH[0], "password": TECH[1],
                                    "csrf_token": csrf_of(page.text), "next": target},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"


def test_a_login_left_unused_ends_and_the_pages_own_refreshing_is_not_use(review_env,
                                                                          monkeypatch):
    """A shared bench PC left logged in: the login ends after review.idle_minutes without
    use; the queue page's polling (X-Poll) does not keep it alive, a click does."""
    import types

    import daemon.review.app as review_app

    clock = [1_000_000.0]
    monkeypatch.setattr(review_app, "time", types.SimpleNamespace(
        monotonic=lambda: clock[0], time=lambda: clock[0]))
    env = review_env
    assert env.cfg.review.idle_minutes == 30.0  # the shipped default
    app = create_app(env.cfg, env.store)
    client = TestClient(app)
    login(client, TECH)
    for _ in range(4):  # 20 minutes of a page refreshing itself, nobody at the bench
        clock[0] += 300
        r = client.get("/api/queue", headers={"X-Poll": "1"})
        assert r.status_code == 200 and "set-cookie" not in r.headers
    r = client.get(f"/slides/{env.slide_id}")  # somebody uses it: the login is renewed
    assert r.status_code == 200 and SESSION_COOKIE in r.headers["set-cookie"]
    clock[0] += 25 * 60
    assert client.get("/", follow_redirects=False).status_code == 200
    for _ in range(5):
        clock[0] += 300
        client.get("/api/queue", headers={"X-Poll": "1"})
    # The next person at the bench opens the login form: not use of the login left open.
    r = client.get("/login")
    assert f"Logged in as {TECH[0]}" in r.text and "set-cookie" not in r.headers
    clock[0] += 600
    r = client.get("/api/queue", headers={"X-Poll": "1"})
    assert r.status_code == 401  # the queue page goes to the login form
    r = client.get(f"/slides/{env.slide_id}", follow_redirects=False)
    assert r.status_code == 303 and "expired=1" in r.headers["location"]
    # Without the setting a login lasts its session_hours, used or not.
    lab = env.cfg.model_copy(update={"review": env.cfg.review.model_copy(update={
        "idle_minutes": None})})
    other = TestClient(create_app(lab, env.store))
    login(other, TECH)
    clock[0] += 5 * 3600
    assert other.get("/", follow_redirects=False).status_code == 200
    # However busy, a login ends after session_hours (12): renewing the cookie on use had
    # made it last for ever.
    busy = TestClient(app)
    login(busy, TECH)
    for _ in range(int(12 * 60 / 20)):
        clock[0] += 20 * 60
        assert busy.get("/", follow_redirects=False).status_code == 200
    clock[0] += 20 * 60
    assert busy.get("/", follow_redirects=False).status_code == 303


def test_only_real_accounts_failed_logins_are_kept_in_the_audit_trail(app, review_env):
    """The trail is append-only: made-up names (5,000 characters each, a new one every time)
    had grown it without bound, and a password typed into the name field was kept for
    ever."""
    client = TestClient(app)
    token = csrf_of(client.get("/login").text)
    for name in ("x" * 5000, "y" * 5000, TECH[1], TECH2[0]):
        r = client.post("/login", data={"username": name, "password": "nope-nope",
                                        "csrf_token": token}, follow_redirects=False)
        assert r.status_code == 401
    with review_env.store.session() as s:
        failed = [e.username for e in s.scalars(select(AuditEvent).where(
            AuditEvent.action == "login_failed"))]
    assert failed == [TECH2[0]]


def test_logging_in_upgrades_an_old_password_hash(app, review_env):
    from argon2 import PasswordHasher

    weak = PasswordHasher(time_cost=1, memory_cost=8192).hash(TECH2[1])
    with review_env.store.session() as s:
        s.execute(update(User).where(User.username == TECH2[0]).values(password_hash=weak))
    login(TestClient(app), TECH2)
    with review_env.store.session() as s:
        now = s.scalar(select(User.password_hash).where(User.username == TECH2[0]))
    assert now != weak and PasswordHasher().verify(now, TECH2[1])


def test_a_form_sent_after_the_session_ended_leads_back_to_its_page(app, review_env):
    client = TestClient(app)
    r = client.post(f"/slides/{review_env.slide_id}/sign", data={"note": "ok"},
                    headers={"referer": f"http://testserver/slides/{review_env.slide_id}"},
                    follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == f"/login?next=/slides/{review_env.slide_id}&expired=1"
    page = client.get(r.headers["location"]).text
    assert "Your session ended" in page and f'value="/slides/{review_env.slide_id}"' in page
    r = client.post(f"/api/slides/{review_env.slide_id}/undo", json={})
    assert r.status_code == 401 and "log in again" in r.json()["error"]
    # A page opened without having logged in (the login form only shown): no "ended".
    r = client.get(f"/slides/{review_env.slide_id}", follow_redirects=False)
    assert r.headers["location"] == f"/login?next=/slides/{review_env.slide_id}"
    client.cookies.clear()
    r = client.get("/", follow_redirects=False)
    assert r.headers["location"] == "/login?next=/"


def test_a_change_without_the_csrf_token_is_refused(app, review_env):
    ids = _ids(review_env)
    client = TestClient(app)
    token = login(client, TECH)
    before = _audit_count(review_env)
    sid, cid = ids["slide_id"], ids["cell_id"]
    changes = [
        (f"/api/slides/{sid}/reclassify", {"cells": [cid], "label": "monocyte"}),
        (f"/api/slides/{sid}/exclude", {"cells": [cid], "reason": "smudge"}),
        (f"/api/slides/{sid}/include", {"cells": [cid]}),
        (f"/api/slides/{sid}/undo", {}),
        (f"/api/slides/{sid}/cells", {"field_id": ids["field_id"], "x": 50, "y": 50,
                                      "label": "monocyte"}),
    ]
    for url, body in changes:
        for headers in ({}, {"X-CSRF-Token": "not-the-token"}, {"X-CSRF-Token": ""}):
            r = client.post(url, json=body, headers=headers)
            assert r.status_code == 403, (url, headers, r.text)
            assert "CSRF" in r.json()["error"]
    for url in (f"/slides/{sid}/sign", f"/slides/{sid}/reopen", "/logout"):
        r = client.post(url, data={"note": "x", "reason": "x"}, follow_redirects=False)
        assert r.status_code == 403, url
        r = client.post(url, data={"csrf_token": "forged", "reason": "x"},
                        follow_redirects=False)
        assert r.status_code == 403, url
    # A token from another user's session does not work in this one.
    other = TestClient(app)
    other_token = login(other, TECH2)
    assert other_token != token
    r = client.post(f"/api/slides/{sid}/reclassify", json={"cells": [cid], "label": "monocyte"},
                    headers={"X-CSRF-Token": other_token})
    assert r.status_code == 403
    assert _audit_count(review_env) == before
    with review_env.store.session() as s:
        assert s.get(Slide, sid).status == "awaiting_review"
        assert s.get(Cell, cid).reviewed_label is None
    # The same request with the token goes through.
    r = client.post(f"/api/slides/{sid}/reclassify", json={"cells": [cid], "label": "monocyte"},
                    headers={"X-CSRF-Token": token})
    assert r.status_code == 200 and _audit_count(review_env) == before + 1


def test_a_technician_cannot_reopen_a_signed_slide(app, review_env):
    sid = review_env.slide_id
    check_flags(review_env.store, sid)
    tech = TestClient(app)
    token = login(tech, TECH)
    assert sign_form(tech, sid, token).status_code == 303
    page = tech.get(f"/slides/{sid}").text
    assert "Only a supervisor can reopen" in page and "/reopen" not in page
    n = _audit_count(review_env)
    r = tech.post(f"/slides/{sid}/reopen", data={"csrf_token": token, "reason": "typo"},
                  follow_redirects=False)
    assert r.status_code == 403 and "supervisor" in r.text
    with review_env.store.session() as s:
        assert s.get(Slide, sid).status == "signed"
    assert _audit_count(review_env) == n
    sup = TestClient(app)
    stoken = login(sup, SUPER)
    r = sup.post(f"/slides/{sid}/reopen", data={"csrf_token": stoken, "reason": ""},
                 follow_redirects=False)
    assert r.status_code == 400  # a reason is required
    r = sup.post(f"/slides/{sid}/reopen", data={"csrf_token": stoken, "reason": "wrong class"},
                 follow_redirects=False)
    assert r.status_code == 303
    with review_env.store.session() as s:
        slide = s.get(Slide, sid)
        assert slide.status == "awaiting_review" and slide.signed_by is None
        ev = s.scalars(select(AuditEvent).where(AuditEvent.slide_id == sid)
                       .order_by(AuditEvent.id.desc())).first()
        assert (ev.action, ev.username, ev.before["signed_by"], ev.after["reason"]) == (
            "reopen", SUPER[0], TECH[0], "wrong class")
    assert _audit_count(review_env) == n + 1


@pytest.mark.parametrize("path", [
    "/images/cells/..%2F..%2F..%2Fetc%2Fpasswd",
    "/images/cells/../../store.db",
    "/images/fields/%2e%2e%2fstore.db",
    "/images/fields/..%5c..%5cstore.db",
    "/images/cells/1%00.png",
    "/images/cells/-1",
    "/static/../store.db",
    "/static/%2e%2e/%2e%2e/auth.py",
])
def test_path_traversal_on_image_routes_is_refused(app, review_env, path):
    client = TestClient(app)
    login(client, TECH)
    r = client.get(path)
    assert r.status_code in (404, 422), (path, r.status_code)
    assert b"SQLite" not in r.content and b"argon2" not in r.content


def test_images_are_served_only_from_the_data_directory(app, review_env):
    ids = _ids(review_env)
    client = TestClient(app)
    login(client, TECH)
    r = client.get(f"/images/cells/{ids['cell_id']}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert client.get(f"/images/fields/{ids['field_id']}").status_code == 200
    # A stored path that points outside the data directory (a tampered row) is not followed.
    secret = review_env.root / "outside.png"
    secret.write_bytes(r.content)
    with review_env.store.session() as s:
        s.execute(update(Cell).where(Cell.id == ids["cell_id"])
                  .values(crop_path="../outside.png"))
        s.execute(update(Field).where(Field.id == ids["field_id"])
                  .values(image_path=str(secret)))
    assert client.get(f"/images/cells/{ids['cell_id']}").status_code == 404
    assert client.get(f"/images/fields/{ids['field_id']}").status_code == 404
    assert client.get("/images/cells/999999").status_code == 404


@pytest.mark.parametrize("change", ["deactivated", "new password", "disabled, enabled again"])
def test_an_account_change_ends_its_sessions(app, review_env, change):
    """A deactivated account, or one given a new password (whoever held the old one keeps
    no session: the signed cookie had stayed valid until it expired). An account disabled
    (a suspected compromise) and enabled again does not bring its old cookies back."""
    from daemon.review.auth import update_user

    client = TestClient(app)
    login(client, TECH2)
    assert client.get("/", follow_redirects=False).status_code == 200
    with review_env.store.session() as s:
        if change == "deactivated":
            s.execute(update(User).where(User.username == TECH2[0]).values(active=False))
        elif change.startswith("disabled"):
            update_user(s, TECH2[0], active=False)
            update_user(s, TECH2[0], active=True)
        else:
            update_user(s, TECH2[0], password="a-brand-new-password-1")
    assert client.get("/", follow_redirects=False).status_code == 303  # log in again
    assert client.get("/api/queue").status_code == 401


def test_session_cookie_is_secure_behind_tls_only_when_asked(review_env):
    """`review.secure_cookies: true` (a TLS proxy in front) marks the cookie Secure, so a
    browser never sends it over plain HTTP; the default keeps it usable on localhost."""
    def cookie(lab) -> str:
        client = TestClient(create_app(lab, review_env.store), base_url="https://testserver")
        page = client.get("/login")
        r = client.post("/login", data={"username": TECH[0], "password": TECH[1],
                                        "csrf_token": csrf_of(page.text), "next": "/"},
                        follow_redirects=False)
        assert r.status_code == 303
        return r.headers["set-cookie"]

    plain = cookie(review_env.cfg)
    secure = cookie(review_env.cfg.model_copy(update={"review": review_env.cfg.review.model_copy(
        update={"secure_cookies": True})}))
    assert "httponly" in plain.lower() and "samesite=strict" in plain.lower()
    assert "; secure" not in plain.lower() and "; secure" in secure.lower()


def test_logout_ends_the_session(app, review_env):
    client = TestClient(app)
    token = login(client, TECH)
    copied = client.cookies.get(SESSION_COOKIE)
    r = client.post("/logout", data={"csrf_token": token}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/", follow_redirects=False).status_code == 303
    assert re.search(r"Log in", client.get("/login").text)
    # On the server too: a copy of the cookie taken before logging out is no session.
    thief = TestClient(app)
    thief.cookies.set(SESSION_COOKIE, copied)
    assert thief.get("/", follow_redirects=False).status_code == 303
    assert thief.get("/api/queue").status_code == 401
    # Who was logged in at the bench, and until when, is in the audit trail.
    with review_env.store.session() as s:
        logins = [(e.username, e.action) for e in s.scalars(
            select(AuditEvent).where(AuditEvent.action.in_(["login", "logout"]))
            .order_by(AuditEvent.id))]
    assert logins == [(TECH[0], "login"), (TECH[0], "logout")]



def test_a_slide_named_outside_latin1_has_its_report_downloaded(app, review_env):
    with review_env.store.session() as s:
        s.execute(update(Slide).where(Slide.id == review_env.slide_id)
                  .values(name="Łódź ✓ 骨髄"))
    client = TestClient(app)
    login(client, TECH)
    for fmt in ("csv", "json", "pdf"):
        r = client.get(f"/slides/{review_env.slide_id}/report.{fmt}")
        assert r.status_code == 200, fmt
        assert f"filename*=UTF-8''%C5%81%C3%B3d%C5%BA" in r.headers["content-disposition"]


def test_wrong_addresses_get_a_page_with_the_navigation_and_a_way_back(app, review_env):
    client = TestClient(app)
    login(client, TECH)
    for url in ("/slides/BM-17", "/no-such-page", f"/slides/{review_env.slide_id}/fields/x"):
        r = client.get(url)
        assert r.status_code == 404 and "text/html" in r.headers["content-type"], url
        assert "Log out" in r.text and "Back to the queue" in r.text, url
    assert client.get("/api/slides/abc").json()["error"]  # the page scripts still get JSON
    # A refused form (a reopen without a reason) links back to the slide it came from.
    r = client.post(f"/slides/{review_env.slide_id}/reopen", data={"reason": " "},
                    headers={"X-CSRF-Token": csrf_of(client.get("/").text),
                             "referer": f"http://testserver/slides/{review_env.slide_id}"})
    assert r.status_code in (400, 403)
    assert f'href="/slides/{review_env.slide_id}">Back</a>' in r.text


def test_a_malformed_form_is_a_bad_request_not_a_missing_page(app, review_env):
    client = TestClient(app)
    token = login(client, TECH)
    r = client.post(f"/slides/{review_env.slide_id}/sign",
                    data={"csrf_token": token, "seen": "abc"})
    assert r.status_code == 400 and "the form sent was incomplete" in r.text


def test_numbers_past_the_stores_integers_are_refused_with_the_usual_headers(app, review_env):
    """An id or `seen` of 2**63 or more had been a 500 without the security headers (and a
    traceback in the log)."""
    client = TestClient(app, raise_server_exceptions=False)
    token = login(client, TECH)
    big = str(2**64)
    for url in (f"/slides/{big}", f"/slides/{review_env.slide_id}/fields/{big}"):
        r = client.get(url)
        assert r.status_code == 404 and "frame-ancestors 'none'" in r.headers[
            "content-security-policy"], url
    r = client.get(f"/api/slides/{big}")
    assert r.status_code == 422 and r.json()["error"] == "a number is too large"
    r = client.post(f"/api/slides/{review_env.slide_id}/exclude", headers={
        "X-CSRF-Token": token}, json={"cells": [2**64], "reason": "smudge"})
    assert r.status_code == 422
    r = client.post(f"/slides/{review_env.slide_id}/sign", data={"csrf_token": token,
                                                                "seen": big})
    assert r.status_code == 400 and "the form sent was incomplete" in r.text
    with review_env.store.session() as s:
        assert s.get(Slide, review_env.slide_id).status == "awaiting_review"


def test_the_login_page_does_not_end_a_session_that_is_still_valid(app, review_env):
    """A link to /login (a bookmark, another site's link) had replaced the cookie: a forced
    logout in the middle of a review. The page says whose login it is, for the next person
    at a shared bench PC to log them out rather than work on under their name."""
    client = TestClient(app)
    login(client, TECH)
    r = client.get(f"/login?next=/slides/{review_env.slide_id}", follow_redirects=False)
    assert r.status_code == 200 and "set-cookie" not in r.headers
    assert f"Logged in as {TECH[0]}" in r.text and 'action="/logout"' in r.text
    assert f'href="/slides/{review_env.slide_id}">Go on as {TECH[0]}' in r.text
    assert 'name="password"' not in r.text
    assert client.get("/", follow_redirects=False).status_code == 200
    r = client.post("/logout", data={"csrf_token": csrf_of(r.text)}, follow_redirects=False)
    assert r.status_code == 303 and client.get("/", follow_redirects=False).status_code == 303


def test_sign_off_can_ask_for_the_signers_password(review_env):
    """review.sign_password: a session left open is not a signature; wrong passwords count
    toward the login lockout, and the note typed is kept."""
    env = review_env
    check_flags(env.store, env.slide_id)
    lab = env.cfg.model_copy(update={"review": env.cfg.review.model_copy(update={
        "sign_password": True})})
    plain = TestClient(create_app(env.cfg, env.store))  # without the setting: no password
    login(plain, TECH)
    page = plain.get(f"/slides/{env.slide_id}").text
    assert 'id="sign-form"' in page and 'id="sign-password"' not in page
    client = TestClient(create_app(lab, env.store))
    token = login(client, TECH)
    assert 'id="sign-password"' in client.get(f"/slides/{env.slide_id}").text
    sign = f"/slides/{env.slide_id}/sign"
    seen = seen_of(client, env.slide_id)
    r = client.post(sign, data={"csrf_token": token, "note": "thin smear", "seen": seen},
                    follow_redirects=False)
    assert r.status_code == 403 and "the password is not yours: not signed" in r.text
    assert "thin smear" in r.text  # the note, to give again
    # A wrong password changes nothing on the slide: other pages need no reload for it.
    with review_env.store.session() as s:
        assert actions.changes_since(s, env.slide_id, int(seen)) == {}
    # No such slide: a 404 before any password is looked at (a refusal on a slide that
    # does not exist had failed to be written: a 500).
    r = client.post("/slides/999999/sign", data={"csrf_token": token, "password": "guess"})
    assert r.status_code == 404
    for _ in range(4):
        client.post(sign, data={"csrf_token": token, "password": "guess"},
                    follow_redirects=False)
    r = client.post(sign, data={"csrf_token": token, "password": TECH[1]},
                    follow_redirects=False)
    assert r.status_code == 403 and "too many wrong passwords" in r.text
    with review_env.store.session() as s:
        assert s.get(Slide, env.slide_id).status == "awaiting_review"
        refused = list(s.scalars(select(AuditEvent).where(
            AuditEvent.action == "password_refused")))
    assert [(e.username, e.slide_id) for e in refused] == [(TECH[0], env.slide_id)] * 5
    assert "refused: wrong password" in client.get(f"/slides/{env.slide_id}/audit").text

    fresh = TestClient(create_app(lab, env.store))  # the lockout has passed (a new app)
    token = login(fresh, TECH)
    r = sign_form(fresh, env.slide_id, token, password=TECH[1])
    assert r.status_code == 303
    with review_env.store.session() as s:
        assert s.get(Slide, env.slide_id).signed_by == TECH[0]
    # Reopening withdraws the result from the LIS: it asks for the password too.
    sup = TestClient(create_app(lab, env.store))
    token = login(sup, SUPER)
    assert 'id="reopen-password"' in sup.get(f"/slides/{env.slide_id}").text
    reopen = f"/slides/{env.slide_id}/reopen"
    r = sup.post(reopen, data={"csrf_token": token, "reason": "wrong patient"})
    assert r.status_code == 403 and "not reopened" in r.text and "wrong patient" in r.text
    with review_env.store.session() as s:
        assert s.get(Slide, env.slide_id).status == "signed"
    r = sup.post(reopen, data={"csrf_token": token, "reason": "wrong patient",
                               "password": SUPER[1]}, follow_redirects=False)
    assert r.status_code == 303
    with review_env.store.session() as s:
        assert s.get(Slide, env.slide_id).status == "awaiting_review"
