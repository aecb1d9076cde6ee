"""marrowcount review (the review web app), user (local accounts), and the store's upkeep:
agreement, export-reviewed, export-reports, purge-images, backup."""

from __future__ import annotations

import getpass
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from daemon.cli.app import ConfigOpt, app, console, err_console, operator
from pipeline.errors import MarrowError

user_app = typer.Typer(help="Local review accounts.", no_args_is_help=True)
app.add_typer(user_app, name="user")

DbOption = Annotated[Optional[str],
                     typer.Option("--db", help="Store URL (default: config store.url).")]
DataDirOption = Annotated[Optional[Path],
                          typer.Option("--data-dir", help="Images and crops folder.")]
StdinOption = Annotated[bool, typer.Option("--password-stdin",
                                           help="Read the password from the first line of stdin.")]


def _store(config: Optional[Path], db: Optional[str], data_dir: Optional[Path],
           existing: bool = False):
    """The config and its store (``--db`` / ``--data-dir`` over it); ``existing`` for commands
    that must not make a new store."""
    from daemon.config import load_config
    from daemon.store import Store, resolve_url

    cfg = load_config(config)
    url = resolve_url(db or cfg.store.url, cfg.resolve)
    return cfg, Store(url, data_dir or cfg.resolve(cfg.store.data_dir),
                      save_field_images=cfg.store.save_field_images,
                      busy_timeout_s=cfg.store.busy_timeout_s, existing=existing)


@app.command("review")
def review(
    db: DbOption = None,
    data_dir: DataDirOption = None,
    host: Optional[str] = typer.Option(None, "--host", help="Bind address (default 127.0.0.1)."),
    port: Optional[int] = typer.Option(None, "--port", help="Port (default: config review.port)."),
    config: Optional[Path] = ConfigOpt,
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
    app = create_app(cfg, store)
    app.state.exporter.kick()  # what a failed export left behind goes out now
    try:
        uvicorn.run(app, host=bind, port=bind_port, log_level="info")
    finally:
        store.close()


@user_app.command("add")
def user_add(
    name: str = typer.Argument(..., help="User name."),
    role: str = typer.Option(..., "--role", help="technician or supervisor."),
    password_stdin: StdinOption = False,
    db: DbOption = None,
    data_dir: DataDirOption = None,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Create a review account; the password is prompted (twice) or read from stdin."""
    from daemon.review.auth import ROLES, create_user

    if role not in ROLES:
        raise MarrowError(f"--role must be one of {', '.join(ROLES)}, not {role!r}")
    password = _password(password_stdin)
    _, store = _store(config, db, data_dir)
    try:
        with store.session() as s:
            create_user(s, name, password, role, by=operator())
    finally:
        store.close()
    console.print(f"user {name!r} ({role}) created")


@user_app.command("passwd")
def user_passwd(
    name: str = typer.Argument(..., help="User name."),
    password_stdin: StdinOption = False,
    db: DbOption = None,
    data_dir: DataDirOption = None,
    config: Optional[Path] = ConfigOpt,
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
    config: Optional[Path] = ConfigOpt,
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

    _, store = _store(config, db, data_dir, existing=True)
    try:
        with store.session() as s:
            update_user(s, name, by=operator(), **changes)  # type: ignore[arg-type]
    finally:
        store.close()


@app.command("audit")
def audit_cmd(
    since: Annotated[Optional[datetime], typer.Option(
        "--since", formats=["%Y-%m-%d"], help="Only events on or after this date (UTC).")] = None,
    accounts: Annotated[bool, typer.Option(
        "--accounts", help="Only events of no slide: logins, logouts, account changes.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines only.")] = False,
    db: DbOption = None,
    data_dir: DataDirOption = None,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """The audit trail, oldest first: every change a person made (cells, cases, sign-offs,
    reopenings, cancellations, purges), every account change, login and logout."""
    import json

    from sqlalchemy import select

    from daemon.models import AuditEvent, Slide
    from daemon.report import iso_time

    _, store = _store(config, db, data_dir, existing=True)
    try:
        with store.session() as s:
            q = (select(AuditEvent, Slide.name).outerjoin(Slide, AuditEvent.slide_id == Slide.id)
                 .order_by(AuditEvent.id))
            if since is not None:
                q = q.where(AuditEvent.at >= since.replace(tzinfo=timezone.utc))
            if accounts:
                q = q.where(AuditEvent.slide_id.is_(None))
            rows = s.execute(q).all()
    finally:
        store.close()
    for ev, slide in rows:
        rec = {"id": ev.id, "at": iso_time(ev.at), "user": ev.username, "action": ev.action,
               "slide": slide, "cell": ev.cell_id, "before": ev.before, "after": ev.after}
        if as_json:
            typer.echo(json.dumps(rec, default=str))
        else:
            what = "" if slide is None else f" {slide}" + ("" if ev.cell_id is None
                                                           else f" cell {ev.cell_id}")
            console.print(f"{rec['at']}  {ev.username}  {ev.action}{what}  "
                          f"{json.dumps(ev.after, default=str) if ev.after else ''}",
                          highlight=False, markup=False)


@user_app.command("list")
def user_list(
    db: DbOption = None,
    data_dir: DataDirOption = None,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """List review accounts."""
    from sqlalchemy import select

    from daemon.models import User

    _, store = _store(config, db, data_dir, existing=True)
    try:
        with store.session() as s:
            for u in s.scalars(select(User).order_by(User.username)):
                state = "" if u.active else " (inactive)"
                console.print(f"{u.username}\t{u.role}{state}", highlight=False)
    finally:
        store.close()


SlideOption = Annotated[list[str], typer.Option(
    "--slide", help="A signed slide by name (repeatable; default: every signed slide).")]
SinceOption = Annotated[Optional[datetime], typer.Option(
    "--since", formats=["%Y-%m-%d"], help="Only slides signed on or after this date (UTC).")]


def _signed_cells(config: Optional[Path], db: Optional[str], data_dir: Optional[Path],
                  slide: list[str], since: Optional[datetime]):
    """The config, the store (open), the signed slides' reviewed cells and each slide's
    methods."""
    from daemon.reviewed import reviewed_cells, signed_slides, slide_method_texts

    cfg, store = _store(config, db, data_dir, existing=True)
    try:
        after = None if since is None else since.replace(tzinfo=timezone.utc)
        slides = signed_slides(store, cfg.taxonomy, slide, after)
        cells = reviewed_cells(store, slides)
        methods = slide_method_texts(store, slides)
    except BaseException:
        store.close()
        raise
    return cfg, store, cells, methods


@app.command("agreement")
def agreement_cmd(
    slide: SlideOption = [],  # noqa: B006 (typer reads the default, never mutates it)
    since: SinceOption = None,
    png: Annotated[Optional[Path], typer.Option(
        "--png", help="Save the confusion matrix (reviewer × machine) as a PNG.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON only.")] = False,
    db: DbOption = None,
    data_dir: DataDirOption = None,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """How often reviewers kept the machine's call on signed slides: agreement, Cohen's kappa,
    per-class sensitivity and precision, and how much review moved each slide's differential.
    Your own slides are the measure of the model on your stain and scanner."""
    import json

    from daemon.reviewed import agreement

    cfg, store, cells, methods = _signed_cells(config, db, data_dir, slide, since)
    store.close()
    res = agreement(cells, cfg.classes, methods)
    if png is not None:
        import numpy as np

        from pipeline.evaluate_classifier import save_confusion_png

        save_confusion_png({f"reviewer × machine ({res['agreement'] or 0:.1%} agree)":
                            np.array(res["confusion"])}, res["classes"], png)
    if as_json:
        typer.echo(json.dumps(res))
        return
    def num(x: float | None, fmt: str) -> str:
        return "–" if x is None else format(x, fmt)

    leuk = res["leukocytes"]
    console.print(f"{leuk['cells']} leukocytes (called so by the machine or a reviewer) on "
                  f"{len(res['slides'])} signed slides: machine and reviewer agree on "
                  f"{num(leuk['agreement'], '.1%')} (Cohen's kappa "
                  f"{num(leuk['kappa'], '.3f')}); all {res['cells']} cells, non-leukocytes "
                  f"included: {num(res['agreement'], '.1%')}, kappa {num(res['kappa'], '.3f')}; "
                  f"{res['missed']} cells added by reviewers (missed), "
                  f"{res['excluded']} left out as smudge or duplicate", highlight=False)
    console.print("Reviewers see the machine's call: this is how often review kept it, not "
                  "accuracy against an independent count (for that, count the same slides by "
                  "hand and compare the CSV reports).", highlight=False)
    if len(res["methods"]) > 1:
        console.print(f"[bold red]These slides were counted with {len(res['methods'])} methods "
                      "(models or settings); the figures pool them. Name the slides of one "
                      "method (--slide) to judge it:[/]")
    for i, (text, n) in enumerate(res["methods"].items(), 1):
        console.print(f"  method {i}, {n} slide{'s' * (n != 1)}: {text}", highlight=False,
                      markup=False)
    t = Table("reviewer's class", "n", "sensitivity", "precision", "F1",
              title="Machine against reviewer, per class")
    for name, v in res["per_class"].items():
        t.add_row(name + (" †" if v.get("reviewer_only") else ""), str(v["n"]),
                  *(num(v[k], ".3f") for k in ("recall", "precision", "f1")))
    console.print(t)
    if any(v.get("reviewer_only") for v in res["per_class"].values()):
        console.print("† named by a reviewer only: the machine never calls it, so every such "
                      "cell is a disagreement", highlight=False)
    s = Table("slide", "cells", "calls changed", "counted (machine → reviewed)",
              "largest share change", "method", title="What review changed")
    s.columns[0].overflow = "fold"  # slide names that share a long beginning stay apart
    ordinal = {text: i for i, text in enumerate(res["methods"], 1)}
    for name, v in res["slides"].items():
        s.add_row(name, str(v["cells"]), str(v["changed"]),
                  f"{v['machine_counted']} → {v['reviewed_counted']}",
                  f"{v['largest_share_change_pp']:.1f} pp ({v['largest_share_change_class']})",
                  ", ".join(str(ordinal[t]) for t in v["methods"]) or "–")
    console.print(s)


@app.command("export-reviewed")
def export_reviewed_cmd(
    out: Annotated[Path, typer.Argument(help="New (or empty) folder for the class tree.")],
    slide: SlideOption = [],  # noqa: B006
    since: SinceOption = None,
    um_per_px: Annotated[Optional[float], typer.Option(
        "--um-per-px", help="Pixel size of the exported images (default: the configured "
        "classifier's working scale).")] = None,
    size: Annotated[int, typer.Option(
        "--size", min=32, max=1024, help="Side of each exported image in pixels (wider than "
        "the 96 px crop, so training's shifted re-crops see real pixels).")] = 128,
    db: DbOption = None,
    data_dir: DataDirOption = None,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Write the cells of signed slides as a folder-per-class tree with the reviewers' final
    classes, ready to be a `folder` source of `marrowcount train`."""
    from daemon.reviewed import export_reviewed

    cfg, store, cells, _ = _signed_cells(config, db, data_dir, slide, since)
    try:
        if um_per_px is None:
            from pipeline.classify import read_checkpoint

            um_per_px = float(read_checkpoint(cfg.resolve(cfg.classifier.checkpoint))["um_per_px"])
        res = export_reviewed(store, cells, out, cfg.classes, um_per_px, size)
    finally:
        store.close()
    console.print(f"{res['written']} cells of {res['slides']} signed slides written to {out} "
                  f"({', '.join(f'{k} {v}' for k, v in res['per_class'].items())})",
                  highlight=False)
    for why, n in res["skipped"].items():
        console.print(f"  skipped {n}: {why}", highlight=False)
    # train_only: a first export is small; kept out of validation and test, it leaves the
    # shipped sources' split (and every model-card figure) comparable. Cells of a
    # reviewer-only class are exported (they are the crops a model of it needs one day) but
    # left out of this source: the model does not learn such a class.
    aside = [c for c in cfg.classes.reviewer_only if res["per_class"].get(c)]
    exclude = f", exclude: [{', '.join(aside)}]" if aside else ""
    console.print("Fine-tune on them with this source added to the shipped ones in your lab "
                  "config (train.sources; see the README):\n"
                  f"  - {{kind: folder, path: {out.resolve()}, um_per_px: {um_per_px:g}, "
                  f"train_only: true{exclude}}}", highlight=False, soft_wrap=True,
                  markup=False)  # "[a, b]" is YAML here, not rich markup
    if aside:
        console.print(f"  ({', '.join(aside)}: reviewer-only, so left out; their crops stay in "
                      "the folder for a model that learns them)", highlight=False)


@app.command("export-reports")
def export_reports_cmd(
    since: Annotated[Optional[datetime], typer.Option(
        "--since", formats=["%Y-%m-%d"],
        help="Also sign-offs and reopenings since this date (UTC); default: since "
             "exporting began.")] = None,
    db: DbOption = None,
    data_dir: DataDirOption = None,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Write issued reports and withdrawal notices not yet exported into review.export_dir,
    the folder the laboratory information system watches (the review app does this at each
    sign-off and reopening; this sends what failed then, or older ones with --since)."""
    from daemon.report_export import export_reports

    cfg, store = _store(config, db, data_dir, existing=True)
    if cfg.review.export_dir is None:
        store.close()
        raise MarrowError("review.export_dir is not set in the config: there is no folder to "
                          "export reports to")
    try:
        run = export_reports(store, cfg, since.replace(tzinfo=timezone.utc) if since else None)
    finally:
        store.close()
    for e in run.exported:
        console.print(f"{e.slide} issue {e.issue} ({e.kind}): "
                      f"{', '.join(p.name for p in e.paths)}", highlight=False)
    for line in run.failed:
        err_console.print(f"[yellow]not exported:[/] {line}", highlight=False)
    console.print(f"{len(run.exported)} exported to {cfg.resolve(cfg.review.export_dir)}",
                  highlight=False)
    if run.failed:
        raise typer.Exit(1)


@app.command("purge-images")
def purge_images_cmd(
    older_than_days: Annotated[Optional[int], typer.Option(
        "--older-than-days", min=1, help="Slides signed more than this many days ago.")] = None,
    signed_before: Annotated[Optional[datetime], typer.Option(
        "--signed-before", formats=["%Y-%m-%d"],
        help="Slides signed before this date (UTC).")] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Only list what would be deleted.")] = False,
    by: Annotated[Optional[str], typer.Option(
        "--by", help="Name in the audit trail (default: the system user).")] = None,
    db: DbOption = None,
    data_dir: DataDirOption = None,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Delete the whole-field images of slides signed (or failed: no result) long enough ago,
    keeping every cell's crop, the counts, reviews, reports and audit trail. Run it from a
    timer to cap disk use."""
    from datetime import timedelta

    from daemon.retention import purge_field_images

    if (older_than_days is None) == (signed_before is None):
        raise MarrowError("give exactly one of --older-than-days N or --signed-before DATE")
    now = datetime.now(timezone.utc)
    cutoff = (now - timedelta(days=older_than_days)
              if older_than_days is not None else signed_before.replace(tzinfo=timezone.utc))
    if cutoff > now:  # a typo'd year would purge every slide signed minutes ago
        raise MarrowError(f"--signed-before {cutoff:%Y-%m-%d} is in the future: give a date "
                          "before today")
    _cfg, store = _store(config, db, data_dir, existing=True)
    try:
        purged = purge_field_images(store, cutoff, by or operator(), dry_run)
    finally:
        store.close()
    verb = "would delete" if dry_run else "deleted"
    for p in purged:
        gone = f", {p.missing} already missing" if p.missing else ""
        console.print(f"{p.slide} ({p.status} {p.ended_at:%Y-%m-%d}): {verb} {p.fields} field "
                      f"images, {p.bytes / 1e6:.1f} MB{gone}", highlight=False)
        if p.not_deleted:
            err_console.print(f"[yellow]warning:[/] {p.slide}: {p.not_deleted} image(s) could "
                              "not be deleted (see the log); delete them by hand",
                              highlight=False)
    console.print(f"{len(purged)} slides signed or failed before {cutoff:%Y-%m-%d %H:%M} UTC: "
                  f"{verb} "
                  f"{sum(p.fields for p in purged)} field images, "
                  f"{sum(p.bytes for p in purged) / 1e6:.1f} MB", highlight=False)


@app.command("backup")
def backup_cmd(
    dest: Annotated[Path, typer.Argument(
        help="Backup folder: new, empty, or an earlier backup (only new files are copied).")],
    keep_databases: Annotated[Optional[int], typer.Option(
        "--keep-databases", min=0,
        help="Earlier backups' databases kept in DEST/previous/, so a damaged store does not "
             "reach the only backup [default: 7, a week of nightly backups].")] = None,
    db: DbOption = None,
    data_dir: DataDirOption = None,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Back up the store (SQLite) while the daemon runs: a consistent snapshot of the database
    and every field image and crop it names, keeping the databases of the backups before.
    Exit status 1 when the store has lost files."""
    from daemon.backup import backup_store

    _cfg, store = _store(config, db, data_dir, existing=True)
    try:
        res = backup_store(store, dest, **({} if keep_databases is None
                                           else {"keep": keep_databases}))
    finally:
        store.close()
    console.print(f"{res.dest}: snapshot of {res.taken_at}, {res.slides} slides, {res.files} "
                  f"files: {res.copied} copied ({res.bytes_copied / 1e6:.1f} MB), "
                  f"{res.unchanged} unchanged, {res.removed} removed (no longer named); "
                  f"{len(res.previous)} earlier database(s) kept in previous/",
                  highlight=False, soft_wrap=True)
    if res.missing:
        err_console.print(f"[bold red]error:[/] {len(res.missing)} file(s) the store names are "
                          f"missing from its data directory, e.g. {', '.join(res.missing[:3])} "
                          f"(listed in {res.dest}/BACKUP.json)", highlight=False, soft_wrap=True)
        raise typer.Exit(1)
