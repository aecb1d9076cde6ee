"""marrowcount review (serve the review web app) and marrowcount user (local accounts)."""

from __future__ import annotations

import getpass
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from daemon.cli.app import app, console, err_console
from pipeline.errors import MarrowError

user_app = typer.Typer(help="Local review accounts.", no_args_is_help=True)
app.add_typer(user_app, name="user")

DbOption = Annotated[Optional[str],
                     typer.Option("--db", help="Store URL (default: config store.url).")]
DataDirOption = Annotated[Optional[Path],
                          typer.Option("--data-dir", help="Images and crops folder.")]
ConfigOption = Annotated[Optional[Path],
                         typer.Option("--config", "-c", help="Lab config YAML.")]
StdinOption = Annotated[bool, typer.Option("--password-stdin",
                                           help="Read the password from the first line of stdin.")]


def _store(config: Optional[Path], db: Optional[str], data_dir: Optional[Path]):
    from daemon.config import load_config
    from daemon.store import Store, resolve_url

    cfg = load_config(config)
    url = resolve_url(db or cfg.store.url, cfg.resolve)
    return cfg, Store(url, data_dir or cfg.resolve(cfg.store.data_dir),
                      save_field_images=cfg.store.save_field_images,
                      busy_timeout_s=cfg.store.busy_timeout_s)


@app.command("review")
def review(
    db: DbOption = None,
    data_dir: DataDirOption = None,
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default: config review.port)."),
    config: ConfigOption = None,
) -> None:
    """Serve the technician review app (queue, galleries, reclassification, sign-off)."""
    import uvicorn

    from daemon.review.app import create_app

    cfg, store = _store(config, db, data_dir)
    bind = host or cfg.review.host
    bind_port = cfg.review.port if port is None else port
    if bind not in ("127.0.0.1", "localhost", "::1") and not cfg.review.secure_cookies:
        err_console.print(f"[yellow]warning:[/] serving on {bind} without HTTPS; put a TLS "
                          "proxy in front and set review.secure_cookies: true")
    console.print(f"review app on http://{bind}:{bind_port}/ (store {store.data_dir})")
    try:
        uvicorn.run(create_app(cfg, store), host=bind, port=bind_port, log_level="info")
    finally:
        store.close()


@user_app.command("add")
def user_add(
    name: str = typer.Argument(..., help="User name."),
    role: str = typer.Option(..., "--role", help="technician or supervisor."),
    password_stdin: StdinOption = False,
    db: DbOption = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Create a review account; the password is prompted (twice) or read from stdin."""
    from daemon.review.auth import ROLES, create_user

    if role not in ROLES:
        raise MarrowError(f"--role must be one of {', '.join(ROLES)}, not {role!r}")
    password = _password(password_stdin)
    _, store = _store(config, db, data_dir)
    try:
        with store.session() as s:
            create_user(s, name, password, role)
    finally:
        store.close()
    console.print(f"user {name!r} ({role}) created")


@user_app.command("passwd")
def user_passwd(
    name: str = typer.Argument(..., help="User name."),
    password_stdin: StdinOption = False,
    db: DbOption = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Set a new password for an account."""
    _update(config, db, data_dir, name, password=_password(password_stdin))
    console.print(f"password of {name!r} changed")


@user_app.command("disable")
def user_disable(
    name: str = typer.Argument(..., help="User name."),
    enable: bool = typer.Option(False, "--enable", help="Re-enable the account instead."),
    db: DbOption = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """Disable an account (its sessions end at once; its audit trail stays), or --enable it."""
    _update(config, db, data_dir, name, active=enable)
    console.print(f"user {name!r} {'enabled' if enable else 'disabled'}")


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    password = getpass.getpass("Password: ")
    if getpass.getpass("Again: ") != password:
        raise MarrowError("the passwords differ")
    return password


def _update(config: Optional[Path], db: Optional[str], data_dir: Optional[Path], name: str,
            **changes: object) -> None:
    from daemon.review.auth import update_user

    _, store = _store(config, db, data_dir)
    try:
        with store.session() as s:
            update_user(s, name, **changes)  # type: ignore[arg-type]
    finally:
        store.close()


@user_app.command("list")
def user_list(
    db: DbOption = None,
    data_dir: DataDirOption = None,
    config: ConfigOption = None,
) -> None:
    """List review accounts."""
    from sqlalchemy import select

    from daemon.models import User

    _, store = _store(config, db, data_dir)
    try:
        with store.session() as s:
            for u in s.scalars(select(User).order_by(User.username)):
                state = "" if u.active else " (inactive)"
                console.print(f"{u.username}\t{u.role}{state}", highlight=False)
    finally:
        store.close()
