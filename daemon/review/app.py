"""The review web app: queue, slide page with gallery and differential, field viewer, sign-off.

``create_app(cfg, store)`` builds a FastAPI app over an open Store. Pages are rendered on the
server (Jinja2); a little plain JavaScript (static/review.js) drives keyboard review and calls
the JSON routes under ``/api``. Every route but the login page and the static files needs a
session; every change needs the session's CSRF token (see daemon/review/auth.py). Images are
served only by cell or field id, from paths the store recorded, never from a request's path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import tempfile
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote, urlsplit

from fastapi import Depends, FastAPI, Form, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field as PydField, create_model
from sqlalchemy import func, select
from sqlalchemy.orm import defer

from daemon.case import LABELS as CASE_LABELS, parse_case
from daemon.models import AuditEvent, Cell, Field, Review, Slide, User
from daemon.provenance import method_text
from daemon.report import (
    HISTORY_VERBS,
    freeze_report,
    build_report,
    iso_time,
    me_definition,
    slides_in_review,
    when_text,
    pixel_size_checks,
    pixel_text,
    slide_methods,
)
from daemon.patient_history import other_results
from daemon.report_export import BackgroundExporter
from daemon.review import actions
from daemon.review.actions import Reviewer, ReviewError
from daemon.review.auth import (
    CSRF_FIELD,
    CSRF_HEADER,
    SESSION_COOKIE,
    SessionCodec,
    Viewer,
    authenticate,
    csrf_matches,
    load_secret,
)
from daemon.store import StoreError, failed_before
from pipeline.errors import ConfigError
from pipeline.stats import (
    Differential,
    blast_thresholds_decided,
    confidence_text,
    differential,
    interval_text,
    value_text,
)
from pipeline.taxonomy import Taxonomy

if TYPE_CHECKING:
    from daemon.config import Config
    from daemon.store import Store

log = logging.getLogger("marrowcount.review")
HERE = Path(__file__).resolve().parent
STATUS_ORDER = {"acquiring": 0, "awaiting_review": 1, "failed": 2, "queued": 3, "signed": 4}
# Audit actions that change what a reviewer hands on or signs: the cells and the case.
REVIEW_CHANGES = (*actions.CELL_ACTIONS, "undo", "edit_case")
SIGNED_SHOWN = 50  # signed slides the queue lists; older ones are found by search
SEARCH_SHOWN = 200
LOGIN_WINDOW_S, LOGIN_MAX_FAILURES = 300.0, 5
IDLE_RENEW_S = 30
POLL_HEADER = "X-Poll"
"""Sent by the pages' own refreshing: not use, for ``review.idle_minutes``."""
# The last audit event a slide page has shown, sent with each change it makes.
SeenHeader = Annotated[int | None, Header(alias="X-Seen")]
GALLERY_COLUMNS = (Cell.id, Cell.field_id, Cell.label, Cell.first_label, Cell.reviewed_label,
                   Cell.confidence, Cell.guided, Cell.needs_review, Cell.excluded,
                   Cell.exclude_reason, Cell.duplicate_of, Cell.duplicate_reason, Cell.added_by,
                   Cell.flag_open.label("flag_open"))


@dataclass(frozen=True)
class Account:
    """Who a password was right for."""

    id: int
    username: str
    role: str
    session_epoch: int


class NotLoggedIn(Exception):
    """No valid session: pages redirect to the login form, everything else answers 401."""


class CsrfError(ReviewError):
    status = 403


class CellsRequest(BaseModel):
    cells: list[int] = PydField(min_length=1, max_length=5000)


# The slide page's case form: each case field, and (was_*) the value the form showed;
# was_shown says the form carries was_* (an empty one arrives as None).
CaseForm = create_model(
    "CaseForm", __config__=ConfigDict(extra="ignore"),
    **{k: (str, "") for k in CASE_LABELS}, **{f"was_{k}": (str | None, None) for k in CASE_LABELS},
    was_shown=(str | None, None))


class ReclassifyRequest(CellsRequest):
    label: str


class ExcludeRequest(CellsRequest):
    reason: str


class AddCellRequest(BaseModel):
    field_id: int
    x: float
    y: float
    label: str


@dataclass(frozen=True)
class Section:
    """One gallery group: a class, or the excluded / duplicate cells."""

    key: str
    title: str
    hotkey: str | None
    cells: list[Any]  # Cell rows (GALLERY_COLUMNS)
    counted: bool


def create_app(cfg: "Config", store: "Store") -> FastAPI:
    params = cfg.review
    taxonomies = {name: Taxonomy(name=name, classes=classes)
                  for name, classes in cfg.taxonomies.items()}
    codec = SessionCodec(load_secret(store.data_dir), params.session_hours * 3600)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["age"] = _age
    templates.env.filters["when"] = when_text
    templates.env.globals.update(value_text=value_text, interval_text=interval_text,
                                 confidence_text=confidence_text,
                                 me_definition=me_definition)
    templates.env.globals["exclude_reasons"] = actions.EXCLUDE_REASONS
    templates.env.globals["history_verbs"] = HISTORY_VERBS
    crop_um_per_px = cfg.train.um_per_px
    failures: dict[str, deque[float]] = defaultdict(deque)  # recent failed logins per name
    failures_lock = threading.Lock()

    app = FastAPI(title="marrowcount review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store = store
    # Signed reports and withdrawals to the LIS folder, off the request threads.
    exporter = app.state.exporter = BackgroundExporter(store, cfg)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # -- sessions -----------------------------------------------------------------------

    def set_session(resp: Response, uid: int | None, csrf: str | None = None,
                    epoch: int = 0) -> None:
        now = int(time.time()) if uid else None
        put_cookie(resp, codec.dumps(uid, csrf, epoch, now, now))

    def put_cookie(resp: Response, value: str) -> None:
        resp.set_cookie(SESSION_COOKIE, value, max_age=int(codec.max_age_s),
                        httponly=True, samesite="strict", secure=params.secure_cookies, path="/")

    def viewer(request: Request) -> Viewer:
        return session_viewer(request, renew=True)

    def session_viewer(request: Request, renew: bool) -> Viewer:
        """The logged-in user, or NotLoggedIn. ``renew``: this request is use, which renews
        the idle timer (the pages' own refreshing, X-Poll, never is)."""
        data = codec.loads(request.cookies.get(SESSION_COOKIE))
        if not data or not isinstance(data.get("uid"), int):
            raise NotLoggedIn()
        now, used, login_at = int(time.time()), data.get("used"), data.get("login")
        if not isinstance(login_at, int) or now - login_at > params.session_hours * 3600:
            raise NotLoggedIn()  # a login lasts session_hours, however busy
        if params.idle_minutes is not None:
            if not isinstance(used, int) or now - used > params.idle_minutes * 60:
                raise NotLoggedIn()
            # Use renews the cookie (each IDLE_RENEW_S at most: a cookie per key press is
            # waste); the pages' own refreshing (X-Poll) is not use.
            if renew and now - used >= IDLE_RENEW_S and not request.headers.get(POLL_HEADER):
                request.state.session_cookie = codec.dumps(data["uid"], data["csrf"],
                                                           data.get("epoch", 0), now, login_at)
        with store.session() as s:
            user = s.get(User, data["uid"])
            # Logged out since, or a new password: a cookie from before is no session.
            if user is None or not user.active or data.get("epoch", 0) != user.session_epoch:
                raise NotLoggedIn()
            return Viewer(user.id, user.username, user.role, data["csrf"])

    async def changer(request: Request, who: Viewer = Depends(viewer)) -> Viewer:
        token = request.headers.get(CSRF_HEADER)
        ctype = request.headers.get("content-type", "")
        if token is None and ctype.startswith(("application/x-www-form-urlencoded",
                                               "multipart/form-data")):
            token = (await request.form()).get(CSRF_FIELD)
        if not csrf_matches(who.csrf, token if isinstance(token, str) else None):
            raise CsrfError("missing or wrong CSRF token; reload the page")
        return who

    def reviewer(who: Viewer) -> Reviewer:
        return Reviewer(who.username, who.role)

    def page(request: Request, name: str, who: Viewer | None, status: int = 200,
             **ctx: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request, name, {"viewer": who, "csrf": who.csrf if who else "", **ctx},
            status_code=status)

    # -- errors and headers -------------------------------------------------------------

    @app.exception_handler(NotLoggedIn)
    async def _not_logged_in(request: Request, exc: NotLoggedIn) -> Response:
        path = request.url.path
        if path.startswith(("/api/", "/images/")):
            return JSONResponse({"error": "not logged in (the session ended): log in again"},
                                status_code=401)
        if request.method == "GET":
            target = path + (f"?{request.url.query}" if request.url.query else "")
        else:  # a form sent after the session ended: log in, then back to the page it was on
            target = urlsplit(request.headers.get("referer", "")).path or "/"
        # "Your session ended" only where there was one: a first visit, or one after the
        # login form was only shown (its cookie carries no user), just logs in.
        cookie = request.cookies.get(SESSION_COOKIE)
        data = codec.loads(cookie) if cookie else None
        ended = request.method != "GET" or (cookie is not None and (
            data is None or data.get("uid") is not None))
        return RedirectResponse(f"/login?next={quote(_local(target))}"
                                + ("&expired=1" if ended else ""), status_code=303)

    def error_page(request: Request, message: str, status: int, title: str | None = None,
                   kept_note: str | None = None) -> Response:
        """An error as JSON for the page scripts, else as a page with the navigation and a
        link back to the page the request came from."""
        if request.url.path.startswith(("/api/", "/images/")):
            return JSONResponse({"error": message}, status_code=status)
        try:
            who: Viewer | None = viewer(request)
        except NotLoggedIn:
            who = None
        back = _local(urlsplit(request.headers.get("referer", "")).path or "/")
        if back == request.url.path:
            back = "/"
        return templates.TemplateResponse(
            request, "error.html", {"viewer": who, "csrf": who.csrf if who else "",
                                    "message": message, "status": status, "back": back,
                                    "title": title, "kept_note": kept_note},
            status_code=status)

    @app.exception_handler(ReviewError)
    async def _review_error(request: Request, exc: ReviewError) -> Response:
        return error_page(request, str(exc), exc.status, getattr(exc, "title", None),
                          getattr(exc, "kept_note", None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = ("no such page" if exc.status_code == 404 else str(exc.detail))
        return error_page(request, message, exc.status_code)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(OverflowError)
    async def _bad_request(request: Request, exc: RequestValidationError | OverflowError
                           ) -> Response:
        # OverflowError: an id or `seen` past the store's 64-bit integers; it was a 500
        # without the security headers and a traceback in the log.
        if isinstance(exc, OverflowError):
            log.warning("%s %s: a number is too large (%s)", request.method,
                        request.url.path[:200], exc)
        if request.url.path.startswith("/api/"):
            errors = ("; ".join(f"{'.'.join(str(p) for p in e['loc'][1:])}: {e['msg']}"
                                for e in exc.errors())
                      if isinstance(exc, RequestValidationError) else "a number is too large")
            return JSONResponse({"error": errors or "bad request"}, status_code=422)
        if request.method != "GET":
            return error_page(request, "the form sent was incomplete or not valid; reload the "
                                       "page and send it again", 400)
        return error_page(request, "this address is not valid here (slides and fields are "
                                   "numbered: open them from the queue)", 404)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Any) -> Response:
        resp = await call_next(request)
        renewed = getattr(request.state, "session_cookie", None)
        if renewed and "set-cookie" not in resp.headers:  # login and logout set their own
            put_cookie(resp, renewed)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        resp.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; "
            "object-src 'none'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
        if not request.url.path.startswith(("/static/", "/images/")):
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    # -- login --------------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/", expired: bool = False) -> Response:
        # Logged in already: a link to /login (a bookmark, another site) must not end the
        # session in the middle of a review, and on a shared bench PC the next person must
        # see whose it is (and log them out) rather than work on under their name.
        with contextlib.suppress(NotLoggedIn):
            # Not use: the next person at the bench opening the login form had renewed the
            # idle timer of the login left open there.
            who = session_viewer(request, renew=False)
            return templates.TemplateResponse(
                request, "login.html", {"viewer": who, "csrf": who.csrf, "current": who,
                                        "next": _local(next), "error": None})
        data = codec.loads(request.cookies.get(SESSION_COOKIE)) or {}
        csrf = data.get("csrf") or secrets.token_urlsafe(24)
        resp = templates.TemplateResponse(
            request, "login.html", {"viewer": None, "csrf": csrf, "next": _local(next),
                                    "error": "Your session ended: log in again; what you "
                                             "sent last was not saved." if expired else None})
        set_session(resp, None, csrf)  # a pre-login session that only carries the CSRF token
        return resp

    @app.post("/login")
    def login(request: Request, username: str = Form(...), password: str = Form(...),
              csrf_token: str = Form(""), next: str = Form("/")) -> Response:
        data = codec.loads(request.cookies.get(SESSION_COOKIE))
        if not data or not csrf_matches(data["csrf"], csrf_token):
            raise CsrfError("the login form expired; reload the page and try again")
        # The name as the account is looked up: " tech" and "tech\t" had each had a lockout
        # counter of their own, so guessing never paused.
        username = username.strip()
        client = request.client.host if request.client else None
        user, wait_s = try_password(username, password, "login_failed", client)
        if user is None and wait_s:
            # Attempts during the pause do not extend it (else a user who keeps trying, or
            # anyone typing their name, keeps them locked out), and the form says how long.
            log.warning("login for %r refused: too many failed attempts", username)
            return templates.TemplateResponse(
                request, "login.html",
                {"viewer": None, "csrf": data["csrf"], "next": _local(next),
                 "error": f"Too many failed attempts for {username}: try again in "
                          f"{max(1, round(wait_s / 60))} min."},
                status_code=429)
        if user is None:
            return templates.TemplateResponse(
                request, "login.html",
                {"viewer": None, "csrf": data["csrf"], "next": _local(next),
                 "error": "Wrong user name or password."},
                status_code=401)
        with failures_lock:
            failures.pop(username, None)
        with store.session() as s:  # who was at the bench, when, from where
            s.add(AuditEvent(username=user.username, action="login",
                             after={"client": client}))
        resp = RedirectResponse(_local(next), status_code=303)
        set_session(resp, user.id, epoch=user.session_epoch)  # a fresh CSRF token per login
        return resp

    def try_password(username: str, password: str, failed_action: str, client: str | None,
                     slide_id: int | None = None) -> tuple[Account | None, float]:
        """Check a password against the lockout: returns the user (None for a wrong password
        or during a pause) and the seconds left of the pause (0 when there is none).

        The attempt is counted before the password is checked, in the same locked step as
        the lockout test: requests sent at once had each passed the test before any failure
        was counted (26 guesses in one burst where 5 were allowed). A wrong password for an
        account is an audit event ``failed_action`` (21 CFR 11.300(d): attempts are detected
        and reported); the one that starts a pause says so. An unknown name, and refusals
        during a pause (which check nothing), are logged only.
        """
        now = time.monotonic()
        with failures_lock:
            recent = failures[username]
            while recent and now - recent[0] > LOGIN_WINDOW_S:
                recent.popleft()
            if len(recent) >= LOGIN_MAX_FAILURES:
                return None, LOGIN_WINDOW_S - (now - recent[0])
            if len(failures) > 10_000:  # many names tried: forget old ones, bound memory
                for name in [n for n, q in failures.items()
                             if n != username and (not q or now - q[-1] > LOGIN_WINDOW_S)]:
                    del failures[name]
            recent.append(now)
            locks = len(recent) >= LOGIN_MAX_FAILURES
        with store.session() as s:
            found = authenticate(s, username, password)
            user = (None if found is None else
                    Account(found.id, found.username, found.role, found.session_epoch))
            # Only a real account's failures are audited: a name typed is not kept for ever
            # (the audit trail is append-only, and a password typed into the name field
            # would be), and made-up names cannot grow it without bound.
            known = user is not None or s.scalar(
                select(User.id).where(User.username == username)) is not None
            if user is None and known:
                s.add(AuditEvent(username=username, action=failed_action,
                                 slide_id=slide_id,
                                 after={"client": client, "paused": locks} if locks
                                 else {"client": client}))
        if user is not None:
            with failures_lock:
                with contextlib.suppress(ValueError):
                    failures[username].remove(now)
        else:
            log.warning("%s for %s from %s%s", failed_action.replace("_", " "),
                        repr(username) if known else "a name that is no account",
                        client, ": paused" if locks else "")
        return user, 0.0

    def check_signature(username: str, password: str, request: Request, slide_id: int,
                        doing: str = "signed") -> None:
        """The signer's password, given again at sign-off or reopening
        (``review.sign_password``); wrong ones count toward the login lockout (the form must
        not be a way to guess it) and are audited on the slide."""
        with store.session() as s:
            actions.get_slide(s, slide_id)  # "no slide N" before any password is looked at
        client = request.client.host if request.client else None
        user, wait_s = try_password(username.strip(), password, "password_refused", client,
                                    slide_id)
        if user is None and wait_s:
            raise actions.Forbidden(f"too many wrong passwords: not {doing}; try again in "
                                    f"{max(1, round(wait_s / 60))} min")
        if user is None:
            raise actions.Forbidden(f"the password is not yours: not {doing} (sign-off and "
                                    "reopening ask for your password again, "
                                    "review.sign_password)")

    @app.post("/logout")
    def logout(who: Viewer = Depends(changer)) -> Response:
        # Ends the session on the server, not only in this browser: a copy of the cookie is
        # refused from now on (and so are this user's other sessions).
        with store.session() as s:
            user = s.get(User, who.id)
            if user is not None:
                user.session_epoch += 1
                s.add(AuditEvent(username=user.username, action="logout"))
        resp = RedirectResponse("/login", status_code=303)
        set_session(resp, None)
        return resp

    # -- queue --------------------------------------------------------------------------

    def queue_rows(q: str = "") -> tuple[list[dict[str, Any]], int]:
        """The queue: every slide not signed and the SIGNED_SHOWN signed most recently; with
        ``q``, every slide whose name or case (accession, patient, specimen) holds it, up to
        SEARCH_SHOWN, newest first. Returns the rows and how many more there were. Counts
        are read for the rows shown only: the store keeps years of slides."""
        # Each row's plan (tens of kB for a scanner slide) is never read here.
        no_plan = defer(Slide.plan, raiseload=True)
        with store.session() as s:
            if q:
                words = q.casefold().split()
                hits = [sid for sid, name, case in s.execute(
                            select(Slide.id, Slide.name, Slide.case_info)
                            .order_by(Slide.id.desc()))
                        if all(w in " ".join([name, *(str(v) for v in (case or {}).values()
                                                      if v is not None)]).casefold()
                               for w in words)]
                more = max(0, len(hits) - SEARCH_SHOWN)
                slides = list(s.scalars(select(Slide).options(no_plan)
                                        .where(Slide.id.in_(hits[:SEARCH_SHOWN]))))
            else:
                # A failed slide has no result to sign: it is shown for a while, then
                # leaves (years of them had filled the queue); a search finds it.
                gone = datetime.now(timezone.utc) - timedelta(days=params.failed_shown_days)
                slides = list(s.scalars(select(Slide).options(no_plan).where(
                    Slide.status != "signed", ~failed_before(gone))))
                signed = list(s.scalars(select(Slide).options(no_plan)
                                        .where(Slide.status == "signed")
                                        .order_by(Slide.signed_at.desc(), Slide.id.desc())
                                        .limit(SIGNED_SHOWN + 1)))
                more = len(signed) > SIGNED_SHOWN and (s.scalar(
                    select(func.count(Slide.id)).where(Slide.status == "signed"))
                    - SIGNED_SHOWN)
                slides += signed[:SIGNED_SHOWN]
            ids = [sl.id for sl in slides]
            final = func.coalesce(Cell.reviewed_label, Cell.label)
            counts: dict[int, dict[str, int]] = defaultdict(dict)
            for sid, label, n in s.execute(
                select(Cell.slide_id, final, func.count())
                .where(Cell.slide_id.in_(ids), Cell.duplicate_of.is_(None),
                       Cell.excluded.is_(False))
                .group_by(Cell.slide_id, final)
            ):
                counts[sid][label] = int(n)
            pending = dict(s.execute(
                select(Cell.slide_id, func.count())
                .where(Cell.slide_id.in_(ids), Cell.flag_open)
                .group_by(Cell.slide_id)).all())
            # Each shown slide's last sign-off, reopening or hand-on: a reopened slide was
            # signed once (not new work); a pre-reviewed one waits for its signer.
            last_step = {sid: (action, u, note, at) for sid, action, u, note, at in s.execute(
                select(Review.slide_id, Review.action, Review.username, Review.note, Review.at)
                .where(Review.slide_id.in_(ids)).order_by(Review.id))}
            changed_at = _last_changes(s, ids)
            in_review = slides_in_review(s, ids)
        shown = sorted(slides, key=lambda sl: (STATUS_ORDER.get(sl.status, 9),
                                               -(_ts(sl.signed_at) or 0) if sl.status == "signed"
                                               else _ts(sl.created_at) or 0))
        pixels = pixel_size_checks(store, [sl.id for sl in shown], cfg)
        rows = []
        for sl in shown:
            tax = taxonomies.get(sl.taxonomy)
            d = (differential(counts[sl.id], tax, cfg.stats, machine=sl.id not in in_review)
                 if tax else None)
            total = d.total if d else 0
            flags = []
            step = last_step.get(sl.id) if sl.status == "awaiting_review" else None
            if step and step[0] == "reopen":
                flags.append(f"reopened by {step[1]}: {step[2]}")
            elif step and step[0] == "pre_review":
                flags.append(f"ready for sign-off: pre-reviewed by {step[1]}"
                             if not _after(changed_at.get(sl.id), step[3]) else
                             f"pre-reviewed by {step[1]}, changed since")
            if pending.get(sl.id) and sl.status != "signed":  # signing answered them
                flags.append(f"{pending[sl.id]} need review")
            if d is not None:
                flags += [f.message for f in d.flags]
            # As on the report: a review that undecides a threshold undoes an adaptive stop.
            if (sl.status not in ("queued", "acquiring") and total < sl.target
                    and not (sl.stopped_because == "adaptive_stop" and d
                             and blast_thresholds_decided(d, cfg.stats))):
                flags.append(f"target not reached ({total}/{sl.target})")
            if tax is None:
                flags.append(f"unknown taxonomy {sl.taxonomy}")
            pixel = pixels[sl.id]
            if pixel and pixel["disagrees"]:
                flags.append(f"pixel size off {pixel['off_pct']:+.0f}%")
            rows.append({"slide": sl, "total": total, "flags": flags,
                         "since": sl.signed_at if sl.status == "signed"
                         else sl.finished_at or sl.started_at or sl.created_at})
        return rows, int(more)

    @app.get("/", response_class=HTMLResponse)
    def queue(request: Request, q: str = "", who: Viewer = Depends(viewer)) -> Response:
        q = q.strip()[:200]
        rows, more = queue_rows(q)
        return page(request, "queue.html", who, rows=rows, refresh_s=params.queue_refresh_s,
                    acquiring=any(r["slide"].status == "acquiring" for r in rows), q=q,
                    more=more, signed_shown=SIGNED_SHOWN, search_shown=SEARCH_SHOWN)

    @app.get("/api/queue")
    def queue_json(request: Request, q: str = "", who: Viewer = Depends(viewer)) -> Response:
        q = q.strip()[:200]
        rows, more = queue_rows(q)
        html = templates.get_template("_queue_rows.html").render(rows=rows, q=q)
        return JSONResponse({
            "rows_html": html, "more": more,
            "acquiring": any(r["slide"].status == "acquiring" for r in rows),
            "slides": [{"id": r["slide"].id, "name": r["slide"].name,
                        "status": r["slide"].status, "counted": r["total"],
                        "flags": r["flags"]} for r in rows],
        })

    # -- slide page ---------------------------------------------------------------------

    def table_context(s: Any, slide: Slide, tax: Taxonomy) -> dict[str, Any]:
        machine = actions.machine_counts(s, slide.id)
        reviewed = actions.reviewed_counts(s, slide.id)
        # The report's basis and flags, word for word: the page is where people sign.
        rep = build_report(store, slide.id, cfg)
        return {"slide": slide,
                "diff": differential(reviewed, tax, cfg.stats, machine=rep["basis"] == "machine"),
                "machine": machine, "machine_total": sum(
                    n for k, n in machine.items() if k in tax.counted),
                "labels": tax.labels, "flags": rep["flags"]}

    def render_table(ctx: dict[str, Any]) -> str:
        return templates.get_template("_table.html").render(**ctx)

    @app.get("/slides/{slide_id}", response_class=HTMLResponse)
    def slide_page(request: Request, slide_id: int, who: Viewer = Depends(viewer)) -> Response:
        with store.session() as s:
            slide = actions.get_slide(s, slide_id)
            tax = actions.taxonomy_of(slide, taxonomies)
            # Only the columns the gallery shows: no JSON probabilities or boxes to parse.
            cells = s.execute(select(*GALLERY_COLUMNS).where(Cell.slide_id == slide_id)
                              .order_by(Cell.field_id, Cell.index)).all()
            fields = s.execute(
                select(Field.id, Field.index, Field.n_counted, Field.image_path)
                .where(Field.slide_id == slide_id).order_by(Field.index)).all()
            reviews = list(s.scalars(select(Review).where(Review.slide_id == slide_id)
                                     .order_by(Review.id)))
            methods = [(method_text(m), m["fields"]) for m in slide_methods(s, slide_id)]
            ctx = table_context(s, slide, tax)
            seen = actions.last_event(s, slide_id)
            flags_open = actions.open_flags(s, slide_id)
            others = other_results(s, slide)
            # The step the slide is at, said at the top of the page: handed on (and whether
            # it changed since) or reopened, with the note or reason.
            step = reviews[-1] if reviews and slide.status != "signed" else None
            step_changed = step is not None and step.action == "pre_review" and _after(
                _last_changes(s, [slide_id]).get(slide_id), step.at)
        # Each sign-off's issue number, where its report can be printed (kept, or the
        # current signature's, which the first print keeps).
        signs = [r for r in reviews if r.action == "sign"]
        issues = {r.id: n for n, r in enumerate(signs, 1)
                  if r.report is not None or (slide.status == "signed" and r is signs[-1])}
        pixel = pixel_size_checks(store, [slide_id], cfg)[slide_id]
        return page(request, "slide.html", who, methods=methods,
                    case=parse_case(slide.case_info), case_labels=CASE_LABELS,
                    case_required=params.require_case, seen=seen, flags_open=flags_open,
                    others=others, name_differs=[o for o in others if o.name_differs],
                    sign_password=params.sign_password,
                    flags_required=params.require_flags_checked,
                    may_sign=who.role in params.sign_roles, user=who.username,
                    pixel=pixel_text(pixel) if pixel and pixel["disagrees"] else "",
                    tax=tax, sections=_sections(cells, tax),
                    blasts_by_review=tax.blasts_by_review,
                    keymap={c.key: c.name for c in tax.classes},
                    n_cells=len(cells), fields=fields, reviews=reviews, issues=issues,
                    step=step, step_changed=step_changed, no_longer={
                        **{r.id: "replaced" for r in signs[:-1]},
                        **({signs[-1].id: "withdrawn"} if signs and slide.status != "signed"
                           else {})},
                    table_html=render_table(ctx), locked=slide.status == "signed",
                    refresh_s=params.queue_refresh_s,
                    signable=slide.status in actions.SIGNABLE, **ctx)

    def apply_change(slide_id: int, seen: int | None, act: Any
                     ) -> tuple[list[Cell], int, dict[str, int]]:
        """Run ``act(session)`` (one review change) for a page that has seen the slide's audit
        events up to ``seen`` (header X-Seen). Returns the changed cells, the page's new last
        seen event, and who changed the slide after ``seen`` (anyone, this user in another
        window too) before this change: the page has not seen those."""
        with store.session() as s:
            # Locked first (as every change locks it), so the events after ``before`` are
            # this change's own, on PostgreSQL too.
            actions.editable_slide(s, slide_id)
            before = actions.last_event(s, slide_id)
            changed = act(s)
            after = actions.last_event(s, slide_id)
            unseen = ({} if seen is None else
                      actions.changes_since(s, slide_id, seen, upto=before))
        return changed, after, unseen

    def change_response(slide_id: int, changed: list[Cell], seen: int | None = None,
                        unseen: dict[str, int] | None = None) -> Response:
        """The changed cells and the new table, with what ``apply_change`` said of the page."""
        with store.session() as s:
            slide = actions.get_slide(s, slide_id)
            ctx = table_context(s, slide, actions.taxonomy_of(slide, taxonomies))
        return JSONResponse({
            "seen": seen, "changed_by_others": unseen or {},
            "changed": [{"id": c.id, "label": actions.final_label(c), "excluded": c.excluded,
                         "exclude_reason": c.exclude_reason,
                         "changed": c.reviewed_label not in (None, c.label),
                         "flag": ("open" if c.flag_open else "checked"
                                  if c.needs_review else None)} for c in changed],
            "table_html": render_table(ctx),
            "total": ctx["diff"].total,
        })

    @app.get("/api/slides/{slide_id}")
    def slide_json(slide_id: int, since: int | None = None,
                   who: Viewer = Depends(viewer)) -> Response:
        """The slide's counts; with ``since`` (an audit event id), who else changed it since."""
        with store.session() as s:
            slide = actions.get_slide(s, slide_id)
            tax = actions.taxonomy_of(slide, taxonomies)
            ctx = table_context(s, slide, tax)
            n_cells = s.scalar(select(func.count()).where(Cell.slide_id == slide_id))
            # Anyone's: this page's own changes have moved ``since`` past them.
            others = {} if since is None else actions.changes_since(s, slide_id, since)
        d: Differential = ctx["diff"]
        return JSONResponse({
            "id": slide.id, "name": slide.name, "status": slide.status,
            "signed_by": slide.signed_by, "signed_at": iso_time(slide.signed_at),
            "cells": n_cells, "machine_counts": ctx["machine"],
            "differential": d.to_dict(), "table_html": render_table(ctx),
            "changed_by_others": others,
        })

    @app.post("/api/slides/{slide_id}/reclassify")
    def reclassify(slide_id: int, body: ReclassifyRequest, seen: SeenHeader = None,
                   who: Viewer = Depends(changer)) -> Response:
        changed, now, unseen = apply_change(slide_id, seen, lambda s: actions.reclassify(
            s, slide_id, body.cells, body.label, reviewer(who), taxonomies))
        return change_response(slide_id, changed, now, unseen)

    @app.post("/api/slides/{slide_id}/exclude")
    def exclude(slide_id: int, body: ExcludeRequest, seen: SeenHeader = None,
                who: Viewer = Depends(changer)) -> Response:
        changed, now, unseen = apply_change(slide_id, seen, lambda s: actions.exclude(
            s, slide_id, body.cells, body.reason, reviewer(who)))
        return change_response(slide_id, changed, now, unseen)

    @app.post("/api/slides/{slide_id}/include")
    def include(slide_id: int, body: CellsRequest, seen: SeenHeader = None,
                who: Viewer = Depends(changer)) -> Response:
        changed, now, unseen = apply_change(slide_id, seen, lambda s: actions.include(
            s, slide_id, body.cells, reviewer(who)))
        return change_response(slide_id, changed, now, unseen)

    @app.post("/api/slides/{slide_id}/undo")
    def undo(slide_id: int, seen: SeenHeader = None, who: Viewer = Depends(changer)) -> Response:
        changed, now, unseen = apply_change(slide_id, seen, lambda s: actions.undo(
            s, slide_id, reviewer(who)))
        return change_response(slide_id, changed, now, unseen)

    @app.post("/api/slides/{slide_id}/cells")
    def add_cell(slide_id: int, body: AddCellRequest, who: Viewer = Depends(changer)) -> Response:
        with store.session() as s:
            cell = actions.add_cell(s, slide_id, body.field_id, body.x, body.y, body.label,
                                    reviewer(who), taxonomies, store.data_dir, crop_um_per_px)
        resp = change_response(slide_id, [cell])
        return resp

    # -- field viewer -------------------------------------------------------------------

    @app.get("/slides/{slide_id}/fields/{field_id}", response_class=HTMLResponse)
    def field_page(request: Request, slide_id: int, field_id: int, cell: int | None = None,
                   who: Viewer = Depends(viewer)) -> Response:
        with store.session() as s:
            slide = actions.get_slide(s, slide_id)
            tax = actions.taxonomy_of(slide, taxonomies)
            fld = s.get(Field, field_id)
            if fld is None or fld.slide_id != slide_id:
                raise actions.NotFound(f"no field {field_id} on slide {slide_id}")
            cells = list(s.scalars(select(Cell).where(Cell.field_id == field_id)
                                   .order_by(Cell.index)))
            ids = [i for (i,) in s.execute(select(Field.id).where(Field.slide_id == slide_id)
                                           .order_by(Field.index))]
        pos = ids.index(field_id)
        return page(request, "field.html", who, slide=slide, field=fld, cells=cells, tax=tax,
                    focus=cell, prev_id=ids[pos - 1] if pos > 0 else None,
                    next_id=ids[pos + 1] if pos + 1 < len(ids) else None,
                    locked=slide.status == "signed", final_label=actions.final_label)

    # -- sign-off -----------------------------------------------------------------------

    @app.post("/slides/{slide_id}/case")
    def set_case(slide_id: int, form: Annotated[CaseForm, Form()],
                 who: Viewer = Depends(changer)) -> Response:
        values = form.model_dump()
        # The values the form showed (was_*), so that only what was edited on it is saved.
        was = {k: values.pop(f"was_{k}") or "" for k in CASE_LABELS}
        with store.session() as s:
            actions.set_case(s, slide_id, values, reviewer(who),
                             was if values.pop("was_shown") else None)
        return RedirectResponse(f"/slides/{slide_id}", status_code=303)

    def page_state(seen: int | None) -> None:
        # Without the page's last seen event the changed-meanwhile check cannot run, and
        # counts someone else changed a moment ago would be signed unseen.
        if seen is None:
            raise ReviewError("The form did not say which changes the page showed: reload "
                              "the slide, look at it, and try again.")

    @app.post("/slides/{slide_id}/sign")
    def sign(request: Request, slide_id: int, note: str = Form(""),
             seen: int | None = Form(None), password: str = Form(""),
             all_cells_seen: bool = Form(False),
             who: Viewer = Depends(changer)) -> Response:
        try:
            if params.sign_password:
                check_signature(who.username, password, request, slide_id)
            page_state(seen)
            with store.session() as s:
                actions.sign(s, slide_id, reviewer(who), note.strip()[:2000],
                             params.require_case, seen, taxonomies, params.sign_roles,
                             params.require_flags_checked, all_cells_seen)
        except ReviewError as exc:
            exc.kept_note = note.strip()[:2000] or None  # shown on the error page, not lost
            raise
        try:
            freeze_report(store, slide_id, cfg, at_sign_off=True)
        except Exception:  # the signature stands; a reopening or the first print keeps it
            log.exception("slide %d signed, but its report was not kept yet", slide_id)
        exporter.kick()
        return RedirectResponse(f"/slides/{slide_id}", status_code=303)

    @app.post("/slides/{slide_id}/pre-review")
    def pre_review(slide_id: int, note: str = Form(""), seen: int | None = Form(None),
                   all_cells_seen: bool = Form(False),
                   who: Viewer = Depends(changer)) -> Response:
        try:
            page_state(seen)
            with store.session() as s:
                actions.pre_review(s, slide_id, reviewer(who), note.strip()[:2000],
                                   params.require_case, seen, taxonomies,
                                   params.require_flags_checked, params.sign_roles,
                                   all_cells_seen)
        except ReviewError as exc:
            exc.kept_note = note.strip()[:2000] or None
            raise
        return RedirectResponse(f"/slides/{slide_id}", status_code=303)

    @app.post("/slides/{slide_id}/reopen")
    def reopen(request: Request, slide_id: int, reason: str = Form(""),
               password: str = Form(""), who: Viewer = Depends(changer)) -> Response:
        not_kept = None
        if who.role == "supervisor" and params.sign_password:
            # Withdrawing a result from the LIS weighs what issuing it does: an unlocked
            # supervisor's screen must not do it either.
            try:
                check_signature(who.username, password, request, slide_id, "reopened")
            except ReviewError as exc:
                exc.kept_note = reason.strip()[:2000] or None
                raise
        if who.role == "supervisor":
            # The signed report is kept before the slide can change, so the issue stays
            # printable. One that cannot be built now (its taxonomy left the config) must not
            # stop a correction: the reopening goes on and says so in the audit trail.
            try:
                freeze_report(store, slide_id, cfg)
            except (ConfigError, StoreError) as exc:
                not_kept = str(exc)
                log.error("slide %d: its signed report could not be kept before reopening: %s",
                          slide_id, exc)
        with store.session() as s:
            actions.reopen(s, slide_id, reviewer(who), reason[:2000], not_kept)
        exporter.kick()  # the LIS learns the result is withdrawn
        return RedirectResponse(f"/slides/{slide_id}", status_code=303)

    @app.get("/slides/{slide_id}/audit", response_class=HTMLResponse)
    def audit_page(request: Request, slide_id: int, who: Viewer = Depends(viewer)) -> Response:
        with store.session() as s:
            slide = actions.get_slide(s, slide_id)
            events = list(s.scalars(select(AuditEvent).where(AuditEvent.slide_id == slide_id)
                                    .order_by(AuditEvent.id)))
            # Each cell's field and number in it, as the field viewer shows them.
            cells = {cid: (fid, idx, fidx) for cid, fid, idx, fidx in s.execute(
                select(Cell.id, Cell.field_id, Cell.index, Field.index)
                .join(Field, Field.id == Cell.field_id).where(Cell.slide_id == slide_id))}
        tax = taxonomies.get(slide.taxonomy)
        return page(request, "audit.html", who, slide=slide, events=events, cells=cells,
                    shown={e.id: _audit_shown(e) for e in events},
                    labels=tax.labels if tax else {},
                    case_labels=CASE_LABELS)

    @app.get("/agreement", response_class=HTMLResponse)
    def agreement_page(request: Request, since: str = "", who: Viewer = Depends(viewer)
                       ) -> Response:
        """The machine against the reviewers on signed slides (`marrowcount agreement`)."""
        from daemon.reviewed import (
            ReviewedError,
            agreement,
            reviewed_cells,
            signed_slides,
            slide_method_texts,
        )

        try:
            after = (datetime.strptime(since, "%Y-%m-%d").replace(tzinfo=timezone.utc)
                     if since else None)
        except ValueError:
            raise actions.ReviewError(f"since {since!r} is not a date (YYYY-MM-DD)") from None
        try:
            slides = signed_slides(store, cfg.taxonomy, (), after)
            res = agreement(reviewed_cells(store, slides), cfg.classes,
                            slide_method_texts(store, slides))
        except ReviewedError as exc:
            res, empty = None, str(exc)
        else:
            empty = ""
        return page(request, "agreement.html", who, res=res, empty=empty, since=since,
                    taxonomy=cfg.taxonomy, labels=cfg.classes.labels)

    @app.get("/slides/{slide_id}/report.{fmt}")
    def report(slide_id: int, fmt: str, issue: int | None = None,
               who: Viewer = Depends(viewer)) -> Response:
        from daemon import report as reports

        if fmt not in reports.FORMATS:
            raise actions.NotFound(f"no {fmt} report; ask for pdf, csv or json")
        with store.session() as s:
            actions.get_slide(s, slide_id)  # "no slide N", not the store's own message
        try:
            rep = reports.issued_report(store, slide_id, cfg, issue)
        except StoreError as exc:
            raise actions.NotFound(str(exc)) from None
        except ConfigError as exc:
            raise ReviewError(str(exc)) from None
        if fmt == "pdf":
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "report.pdf"
                reports.report_pdf(rep, path)
                data: bytes | str = path.read_bytes()
        else:
            data = reports.report_json(rep) if fmt == "json" else reports.report_csv(rep)
        media = {"pdf": "application/pdf", "csv": "text/csv; charset=utf-8",
                 "json": "application/json"}[fmt]
        name = f"{reports.file_safe(rep['slide']['name'])}-{slide_id}"
        # A signed report, an amended one and a preliminary one must not share a file name
        # in Downloads.
        n = (rep.get("issue") or {}).get("number")
        state = ("preliminary" if n is None else "signed" if n == 1 else f"amended-{n}") + (
            "-superseded" if rep.get("superseded") else "")
        filename = f"{name}-{state}.{fmt}"
        # Headers are Latin-1: a slide named "Łódź 骨髄" had no report to download (500). The
        # plain name falls back to ASCII; filename* (RFC 6266) gives browsers the real one.
        plain = filename.encode("ascii", "replace").decode().replace("?", "_")
        return Response(data, media_type=media, headers={
            "Content-Disposition": f'attachment; filename="{plain}"; '
                                   f"filename*=UTF-8''{quote(filename)}"})

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response(status_code=204)

    # -- images, by id only -------------------------------------------------------------

    @app.get("/images/cells/{cell_id}")
    def cell_image(cell_id: int, who: Viewer = Depends(viewer)) -> Response:
        with store.session() as s:
            rel = s.scalar(select(Cell.crop_path).where(Cell.id == cell_id))
        return _image(actions.image_file(store.data_dir, rel))

    @app.get("/images/fields/{field_id}")
    def field_image(field_id: int, who: Viewer = Depends(viewer)) -> Response:
        with store.session() as s:
            rel = s.scalar(select(Field.image_path).where(Field.id == field_id))
        return _image(actions.image_file(store.data_dir, rel))

    return app


def _sections(cells: list[Any], tax: Taxonomy) -> list[Section]:
    by_label: dict[str, list[Cell]] = defaultdict(list)
    excluded, duplicates = [], []
    for c in cells:
        if c.duplicate_of is not None:
            duplicates.append(c)
        elif c.excluded:
            excluded.append(c)
        else:
            by_label[actions.final_label(c)].append(c)
    out = [Section(cls.name, cls.label, cls.key, by_label.pop(cls.name, []), cls.counted)
           for cls in tax.classes]
    out += [Section(name, f"{name} (not in taxonomy {tax.name})", None, cs, False)
            for name, cs in sorted(by_label.items())]
    out.append(Section("_excluded", "Excluded", None, excluded, False))
    out.append(Section("_duplicates", "Suppressed duplicates (never counted)", None,
                       duplicates, False))
    return out


def _image(path: Path) -> Response:
    media = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(
        path.suffix.lower())
    if media is None:
        raise actions.NotFound("image not found")
    return FileResponse(path, media_type=media,
                        headers={"Cache-Control": "private, max-age=3600"})


def _local(target: str) -> str:
    """A redirect target only if it stays on this site (no open redirects)."""
    # Browsers drop tabs and line breaks from a URL: "/\t/evil.example" is "//evil.example".
    if (not target.startswith("/") or "\\" in target
            or any(c < " " or c == "\x7f" for c in target) or target.startswith("//")):
        return "/"
    return target


def _utc(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt  # SQLite drops tz


def _ts(dt: datetime | None) -> float | None:
    dt = _utc(dt)
    return dt.timestamp() if dt else None


def _last_changes(s: Any, slide_ids: list[int]) -> dict[int, datetime]:
    """When each slide's cells or case last changed: a hand-on older than that is not the
    slide as it stands."""
    return dict(s.execute(
        select(AuditEvent.slide_id, func.max(AuditEvent.at))
        .where(AuditEvent.slide_id.in_(slide_ids), AuditEvent.action.in_(REVIEW_CHANGES))
        .group_by(AuditEvent.slide_id)).all())


def _after(a: datetime | None, b: datetime | None) -> bool:
    """Whether time ``a`` is later than ``b`` (either may be missing or naive UTC)."""
    a, b = _utc(a), _utc(b)
    return a is not None and b is not None and a > b


def _audit_shown(e: AuditEvent) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the audit page shows of an event's before and after: for a change to a cell its
    class and what changed (not every unchanged property); anything else whole."""
    before, after = e.before or {}, e.after or {}
    if not (e.cell_id and before and after):
        return before, after
    keys = ["label"] + [k for k in before if k != "label" and before[k] != after.get(k, before[k])]
    return ({k: before[k] for k in keys if k in before},
            {k: after[k] for k in [*keys, "undoes", "note"] if k in after})


def _age(dt: datetime | None) -> str:
    dt = _utc(dt)
    if dt is None:
        return "–"
    s = max(0, int((datetime.now(timezone.utc) - dt).total_seconds()))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"
