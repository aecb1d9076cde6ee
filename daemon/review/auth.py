"""Local accounts, signed session cookies and CSRF tokens for the review app.

Passwords are stored as argon2id hashes (argon2-cffi). A session is a cookie signed with a
secret kept in the data directory (``review_secret``, mode 0600, created on first use); it
holds the user id, a CSRF token and the login time, and is HttpOnly and SameSite=Strict. The
user is looked up on every request, so deactivating an account or changing a role takes effect
at once. Every state-changing request must echo the session's CSRF token, as the form field
``csrf_token`` or the header ``X-CSRF-Token``.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeTimedSerializer
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from daemon.models import AuditEvent, User
from pipeline.errors import MarrowError

ROLES = ("technician", "supervisor")
USERNAME = re.compile(r"[A-Za-z0-9._@-]{1,100}")
SESSION_COOKIE = "marrowcount_session"
CSRF_HEADER = "X-CSRF-Token"
CSRF_FIELD = "csrf_token"
MIN_PASSWORD_LEN = 8

_hasher = PasswordHasher()
# Verified against when the user does not exist, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash("not a real password")


class AuthError(MarrowError):
    """A user that cannot be created (bad name, role or password, name taken)."""


@dataclass(frozen=True)
class Viewer:
    """The logged-in user of one request."""

    id: int
    username: str
    role: str
    csrf: str

    @property
    def is_supervisor(self) -> bool:
        return self.role == "supervisor"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def create_user(session: Session, username: str, password: str, role: str,
                by: str = "system") -> User:
    """Add an active local account; audited as ``user_add`` by ``by``. Raises AuthError
    with the reason when it cannot."""
    username = username.strip()
    if not USERNAME.fullmatch(username):
        # ASCII only: "ѕuper" (a Cyrillic ѕ) would sign as someone who reads as "super".
        raise AuthError(f"user name {username!r} must be 1-100 ASCII letters, digits or . _ - @, "
                        "no spaces")
    if role not in ROLES:
        raise AuthError(f"role {role!r} must be one of {', '.join(ROLES)}")
    _password_ok(password)
    taken = session.scalar(select(User.username).where(
        func.lower(User.username) == username.lower()))
    if taken is not None:
        raise AuthError(f"user {username!r} already exists" if taken == username else
                        f"user {taken!r} already exists; {username!r} would read as the same")
    user = User(username=username, password_hash=hash_password(password), role=role, active=True)
    session.add(user)
    session.add(AuditEvent(username=by, action="user_add",
                           after={"user": username, "role": role}))
    session.flush()
    return user


def _password_ok(password: str) -> None:
    if len(password) < MIN_PASSWORD_LEN:
        raise AuthError(f"password must have at least {MIN_PASSWORD_LEN} characters")


def update_user(session: Session, username: str, *, password: str | None = None,
                active: bool | None = None, by: str = "system") -> User:
    """Set a new password and/or (de)activate an account; a deactivated user's session ends.
    Each change is audited (``user_password``, ``user_disable``, ``user_enable``) by ``by``:
    an account whose password anyone with a shell reset must not sign unseen."""
    user = session.scalar(select(User).where(User.username == username.strip()))
    if user is None:
        raise AuthError(f"no user {username!r}")
    if password is not None:
        _password_ok(password)
        user.password_hash = hash_password(password)
        user.session_epoch += 1  # whoever held the old password is logged out
        session.add(AuditEvent(username=by, action="user_password",
                               after={"user": user.username}))
    if active is not None and active != user.active:
        user.active = active
        user.session_epoch += 1  # re-enabled, a cookie from before must not come back
        session.add(AuditEvent(username=by, action="user_enable" if active else "user_disable",
                               before={"user": user.username, "active": not active},
                               after={"user": user.username, "active": active}))
    session.flush()
    return user


def authenticate(session: Session, username: str, password: str) -> User | None:
    """The active user with this name and password, else None (same cost either way)."""
    user = session.scalar(select(User).where(User.username == username.strip()))
    stored = user.password_hash if user is not None else _DUMMY_HASH
    try:
        _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is None or not user.active:
        return None
    if _hasher.check_needs_rehash(stored):
        user.password_hash = hash_password(password)
    return user


def load_secret(data_dir: Path) -> bytes:
    """The cookie-signing secret, created (0600) in ``data_dir`` on first use."""
    path = Path(data_dir) / "review_secret"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise AuthError(f"{path} holds no usable secret; delete it to create a new one")
    return secret.encode()


class SessionCodec:
    """Signs and checks the session cookie's payload ``{"uid": int|None, "csrf": str,
    "epoch": int, "used": int|None, "login": int|None}`` (``epoch``: the user's
    ``session_epoch`` when it was issued; ``used``: the Unix second it was last used, for
    ``review.idle_minutes``; ``login``: when the user logged in, for ``review.session_hours``:
    a cookie renewed on use is signed afresh, so its signature's age no longer says it)."""

    def __init__(self, secret: bytes, max_age_s: float) -> None:
        self._s = URLSafeTimedSerializer(secret, salt="marrowcount-review-session")
        self.max_age_s = max_age_s

    def dumps(self, uid: int | None, csrf: str | None = None, epoch: int = 0,
              used: int | None = None, login: int | None = None) -> str:
        return self._s.dumps({"uid": uid, "csrf": csrf or secrets.token_urlsafe(24),
                              "epoch": epoch, "used": used, "login": login})

    def loads(self, cookie: str | None) -> dict[str, Any] | None:
        if not cookie:
            return None
        try:
            data = self._s.loads(cookie, max_age=self.max_age_s)
        except BadSignature:  # includes SignatureExpired
            return None
        if not isinstance(data, dict) or not isinstance(data.get("csrf"), str):
            return None
        return data


def csrf_matches(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(expected, given)
