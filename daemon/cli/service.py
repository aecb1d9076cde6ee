"""marrowcount service commands: ``daemon``, ``submit``, ``status``, ``report``, ``demo``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from daemon.cli.app import ConfigOpt, app, console, err_console, operator
from pipeline.stats import confidence_text, interval_text, value_text


def _store(cfg: Any, existing: bool = False) -> Any:
    """The configured store; ``existing`` for commands that only read it."""
    from daemon.store import Store

    return Store.from_params(cfg.store, cfg.resolve, existing)


@app.command("daemon")
def daemon_cmd(
    config: Optional[Path] = ConfigOpt,
    exit_when_idle: bool = typer.Option(
        False, "--exit-when-idle", help="Return once no slide is queued or left to resume."),
) -> None:
    """Run the counting service in the foreground (systemd runs it this way)."""
    from daemon.config import load_config
    from daemon.service import Service, setup_logging

    cfg = load_config(config)  # a missing or invalid config is a clear error here, at start
    setup_logging(cfg.service.log_format, cfg.service.log_level)
    svc = Service(cfg, config)
    try:
        svc.install_signal_handlers()
        svc.run(exit_when_idle=exit_when_idle)
    finally:
        svc.close()


@app.command("submit")
def submit_cmd(
    slide: Path = typer.Argument(..., help="Virtual slide file (make-slide .tif) or a "
                                           "Micro-Manager .cfg for a slide on the microscope."),
    name: Optional[str] = typer.Option(None, "--name", help="Slide name (default: file name)."),
    target: Optional[int] = typer.Option(None, "--target", help="Cells to count (default: config)."),
    um_per_px: Optional[float] = typer.Option(
        None, "--um-per-px", help="Pixel size, over the file's or the microscope's own."),
    accession: Optional[str] = typer.Option(None, "--accession", help="Accession number."),
    patient_id: Optional[str] = typer.Option(None, "--patient-id", help="Patient ID (MRN)."),
    patient_name: Optional[str] = typer.Option(None, "--patient-name"),
    specimen: Optional[str] = typer.Option(
        None, "--specimen", help="e.g. 'bone marrow aspirate, left PSIS'."),
    collected_on: Optional[str] = typer.Option(
        None, "--collected-on", help="Collection date, YYYY-MM-DD."),
    config: Optional[Path] = ConfigOpt,
    json_out: bool = typer.Option(False, "--json", help="Print a JSON object only."),
) -> None:
    """Queue a slide for the daemon, with its case (patient, specimen) where known; the
    reviewer can complete the case on the slide's page."""
    from daemon.case import parse_case
    from daemon.config import load_config
    from daemon.service import submit_slide

    cfg = load_config(config)
    case = parse_case({"accession": accession, "patient_id": patient_id,
                       "patient_name": patient_name, "specimen": specimen,
                       "collected_on": collected_on})
    with _store(cfg) as store:
        sid = submit_slide(store, cfg, slide, name=name, target=target, um_per_px=um_per_px,
                           case=case, by=operator())
        s = store.slide(sid)
    if json_out:
        typer.echo(json.dumps({"id": sid, "name": s.name, "source": s.source,
                               "target": s.target, "status": s.status,
                               "case": s.case_info or {}}))
    else:
        console.print(f"queued slide {s.name!r} (id {sid}, {s.source}, target {s.target})",
                      highlight=False)


@app.command("cancel")
def cancel_cmd(
    slide: str = typer.Argument(..., help="Slide name or id."),
    reason: str = typer.Option(..., "--reason", help="Why, for the record."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """End a queued slide, or a started one whose daemon is not running (stop it first), as
    failed with the reason; its counted fields stay on record. The next slide can then be
    submitted on that microscope."""
    from daemon.config import load_config
    from daemon.service import cancel_slide

    cfg = load_config(config)
    with _store(cfg, existing=True) as store:
        s = cancel_slide(store, slide, operator(), reason)
    console.print(f"cancelled slide {s.name!r} (was {s.status}): {reason}", highlight=False)


def _status_rows(store: Any, cfg: Any, statuses: list[str] | None) -> list[dict[str, Any]]:
    """Per slide its acquisition progress; ``counted`` is the machine's count, ``reviewed`` the
    count a review has left (None before any review), which the report gives."""
    from daemon.report import slides_in_review

    slides = store.slides(statuses, plan=False)
    with store.session() as sess:
        in_review = slides_in_review(sess, [s.id for s in slides])
    progress = store.progress_of([s.id for s in slides])
    rows = []
    for s in slides:
        prog = progress[s.id]
        reviewed = None
        if s.id in in_review and s.taxonomy in cfg.taxonomies:
            counted = {c.name for c in cfg.taxonomies[s.taxonomy] if c.counted}
            reviewed = sum(n for k, n in store.reviewed_counts(s.id).items() if k in counted)
        rows.append({"id": s.id, "name": s.name, "source": s.source, "status": s.status,
                     "counted": prog.counted, "reviewed": reviewed, "target": s.target,
                     "fields": prog.n_fields, "stopped_because": s.stopped_because,
                     "error": s.error, "instrument": s.worker,
                     "accession": (s.case_info or {}).get("accession")})
    return rows


def _status_view(rows: list[dict[str, Any]]) -> Any:
    from rich.console import Group

    active = [r for r in rows if r["status"] in ("queued", "acquiring")]
    done = [r for r in rows if r["status"] not in ("queued", "acquiring")]
    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[note]}"))
    for r in active:
        prog.add_task(f"{escape(r['name'])} ({r['status']})", total=r["target"],
                      completed=min(r["counted"], r["target"]),
                      note=escape(r["error"] or f"{r['fields']} fields"))
    table = Table(title=f"{len(active)} in the queue, {len(done)} finished", title_justify="left")
    for col in ("id", "slide", "accession", "status", "counted", "fields", "note"):
        table.add_column(col)
    for r in done[-20:]:
        note = r["error"] or r["stopped_because"] or ""
        counted = f"{r['counted']}/{r['target']}" + (
            "" if r["reviewed"] in (None, r["counted"]) else f" ({r['reviewed']} after review)")
        table.add_row(str(r["id"]), escape(r["name"]), escape(r["accession"] or ""), r["status"],
                      counted, str(r["fields"]), escape(note))
    if not done:  # no empty table under the queue's bars
        return Group(prog, f"{len(active)} in the queue, none finished")
    return Group(prog, table) if active else table


@app.command("status")
def status_cmd(
    config: Optional[Path] = ConfigOpt,
    watch: bool = typer.Option(False, "--watch", "-w", help="Keep refreshing (Ctrl-C ends)."),
    json_out: bool = typer.Option(False, "--json", help="Print a JSON list only."),
) -> None:
    """Show the queue and the running counts, with a progress bar per slide."""
    from daemon.config import load_config

    cfg = load_config(config)
    with _store(cfg, existing=True) as store:
        if json_out:
            typer.echo(json.dumps(_status_rows(store, cfg, None)))
            return
        if not watch:
            console.print(_status_view(_status_rows(store, cfg, None)))
            return
        if not console.is_terminal:
            # Piped to a file or a log: a live display shows nothing until it ends, so print
            # the view afresh every few seconds.
            try:
                while True:
                    console.print(f"-- {time.strftime('%Y-%m-%d %H:%M:%S')}", highlight=False)
                    console.print(_status_view(_status_rows(store, cfg, None)))
                    console.file.flush()
                    time.sleep(5.0)
            except KeyboardInterrupt:
                return
        try:
            with Live(_status_view(_status_rows(store, cfg, None)), console=console,
                      refresh_per_second=2) as live:
                while True:
                    time.sleep(1.0)
                    live.update(_status_view(_status_rows(store, cfg, None)))
        except KeyboardInterrupt:
            pass


@app.command("report")
def report_cmd(
    slide: str = typer.Argument(..., help="Slide name or id."),
    fmt: str = typer.Option("json", "--format", "-f", help="json, csv or pdf."),
    out: Optional[Path] = typer.Option(None, "--out", "-o",
                                       help="File to write (pdf default: SLIDE.pdf)."),
    issue: Optional[int] = typer.Option(
        None, "--issue", min=1,
        help="Print this sign-off's report (1 = the first); default: the latest as issued, "
             "or the preliminary report of a slide not signed."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Write a slide's report: differential with 95% intervals, M:E, blast %, flags, review.
    A signed slide's report is printed as its sign-off issued it."""
    from daemon.config import load_config
    from daemon.report import FORMATS, write_report
    from pipeline.errors import MarrowError

    if fmt not in FORMATS:
        raise MarrowError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    cfg = load_config(config)
    with _store(cfg, existing=True) as store:
        _rep, path, text = write_report(store, slide, cfg, fmt, out, issue)
    if text is not None:
        typer.echo(text, nl=False)
    else:
        err_console.print(f"wrote {path}", highlight=False)


def differential_table(rep: dict[str, Any]) -> Table:
    """The report's differential as a rich table, with M:E and blast % beneath."""
    d = rep["differential"]
    conf = f"{confidence_text(d['confidence'])} CI"
    t = Table(title=f"{rep['slide']['name']}: {d['total']} leukocytes (counts: {rep['basis']})",
              title_justify="left")
    for col, just in (("class", "left"), ("n", "right"), ("%", "right"), (conf, "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for c in d["classes"]:
        t.add_row(c["label"] + (" †" if c.get("reviewer_only") else ""), str(c["n"]),
                  value_text(c["pct"], 1, c["outside"], c["reference_pct"], 2),
                  interval_text(c["ci_low_pct"], c["ci_high_pct"], 1, " – "))
    me = ("n/a" if not d["me_ci"] else
          f"{value_text(d['me_ratio'], 2, d['me_outside'], d['me_reference'], 3, missing='∞')}  "
          f"({interval_text(d['me_ci'][0], d['me_ci'][1] or math.inf, 2, ' – ')})")
    t.add_section()
    t.add_row("M:E ratio", f"{d['myeloid']}:{d['erythroid']}", "", me)
    blast = (("no cell counted" if not d["total"] else "until reviewed"
              if d.get("blast_reviewer_only") else "not in taxonomy")
             if d["blast_pct"] is None else
             f"{value_text(d['blast_pct'], 1)}%  ({interval_text(*d['blast_ci_pct'], 1, ' – ')})")
    t.add_row("Blasts", "" if d["blast_n"] is None else str(d["blast_n"]), "", blast)
    return t


@app.command("demo")
def demo_cmd(
    config: Optional[Path] = ConfigOpt,
    target: int = typer.Option(500, "--target", help="Cells to count."),
    seed: int = typer.Option(0, "--seed", help="Virtual slide seed."),
    prescan: bool = typer.Option(True, "--prescan/--no-prescan",
                                 help="Pre-scan the slide at 10x before counting at 100x."),
) -> None:
    """The main job on the virtual microscope: build a slide, pre-scan it, run the daemon on
    it, count TARGET cells with progress, print the differential; the result waits for review."""
    from daemon.config import load_config
    from daemon.report import build_report, prescan_text
    from daemon.service import Event, Service, setup_logging, submit_slide

    cfg = load_config(config)
    acq = cfg.acquisition
    cfg = cfg.model_copy(update={
        "service": cfg.service.model_copy(update={"metrics_port": 0, "instrument": "demo"}),
        "acquisition": acq.model_copy(update={
            "prescan": acq.prescan.model_copy(update={"enabled": prescan})})})
    setup_logging("text", "warning")
    slide_path = build_demo_slide(cfg, seed)
    with _store(cfg) as store:
        name = f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
        sid = submit_slide(store, cfg, slide_path, name=name, target=target, by=operator())
    console.print(f"submitted {name} ({slide_path.name}); store {cfg.store.url}", highlight=False)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TextColumn("{task.fields[note]}"), TimeElapsedColumn(), console=console)
    task = progress.add_task("loading model", total=target, note="")

    def on_event(e: Event) -> None:
        if e.slide_id != sid:
            return
        note = e.data.get("skipped") or (f"field {e.data['field']}: +{e.data['cells']}"
                                         if e.kind == "field" else e.kind.replace("_", " "))
        progress.update(task, description=e.name, completed=min(e.counted, e.target),
                        note=note)

    svc = Service(cfg, config, on_event=on_event)
    try:
        svc.install_signal_handlers()
        with progress:
            svc.run(exit_when_idle=True, only_slide=sid)
        rep = build_report(svc.store, sid, cfg)
    finally:
        svc.close()
    console.print(differential_table(rep))
    for f in rep["flags"]:
        console.print(f"flag: {f}", highlight=False)
    s = rep["slide"]
    if s["prescan"]:
        console.print(prescan_text(s["prescan"]), highlight=False)
    console.print(
        f"slide {s['name']} is {s['status']} ({s['fields']} fields, stopped: "
        f"{s['stopped_because']}). Review it with `marrowcount review`; report with "
        f"`marrowcount report {s['name']} --format pdf`.", highlight=False)


def build_demo_slide(cfg: Any, seed: int) -> Path:
    """A small virtual slide under var/demo (built once per seed and reused)."""
    from drivers.slidegen import build_slide, classifier_split_paths, write_slide

    out = cfg.resolve("var/demo") / f"slide-{seed}.tif"
    if out.is_file():
        return out
    params = cfg.slidegen.model_copy(update={"width_px": 1388 * 6, "height_px": 1040 * 5})
    with console.status("building a virtual slide from held-out real cells..."):
        try:
            heldout = classifier_split_paths(cfg, "test")
        except Exception:  # no training config: fall back to slidegen's own held-out split
            heldout = None
        slide = build_slide(params, seed, heldout)
        write_slide(slide, out, out.with_suffix(".json"), params)
    return out
