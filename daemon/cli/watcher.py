"""marrowcount watcher commands: ``watch`` runs the scanner-folder watcher in the foreground."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer

from daemon.cli.app import ConfigOpt, app, console, err_console
from daemon.config import load_config
from pipeline.errors import ConfigError



@app.command("watch")
def watch(
    folder: Path = typer.Argument(..., help="Scanner output folder to watch."),
    um_per_px: Optional[float] = typer.Option(
        None, "--um-per-px", help="Pixel size for files whose metadata has none."),
    grouping: Optional[str] = typer.Option(
        None, "--grouping", help="file | subfolder | pattern (default from config)."),
    pattern: Optional[str] = typer.Option(
        None, "--pattern", help="Regex on file names with a (?P<slide>...) group."),
    marker: Optional[str] = typer.Option(
        None, "--marker", help="Completion marker suffix, e.g. .done."),
    target: Optional[int] = typer.Option(None, "--target", help="Counted cells per slide."),
    case_pattern: Optional[str] = typer.Option(
        None, "--case-pattern",
        help="Regex on slide names whose named groups (accession, patient_id, patient_name, "
             "specimen, collected_on) fill the case."),
    stable_seconds: Optional[float] = typer.Option(
        None, "--stable-seconds", help="Size and mtime unchanged this long = file complete."),
    once: bool = typer.Option(
        False, "--once", help="Process what is there (backlog), count it, then exit."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per event on stdout."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Watch FOLDER in the foreground and count each new slide into the store.

    Counting is the daemon's own loop (same store, model, quality gate and resume); Ctrl-C
    finishes the field being counted, and the next run resumes at the following field.
    """
    from daemon.service import Service
    from drivers.folder import FolderWatcher, WatchEvent, WatchParams

    if not folder.is_dir():
        raise ConfigError(f"watch folder {folder} does not exist or is not a folder")
    cfg = load_config(config)
    entry: dict[str, object] = {"path": str(folder.resolve())}
    for key, value in (("um_per_px", um_per_px), ("grouping", grouping), ("pattern", pattern),
                       ("marker", marker), ("target", target), ("case_pattern", case_pattern)):
        if value is not None:
            entry[key] = value
    data = cfg.watch.model_dump()
    data["folders"] = [entry]
    if stable_seconds is not None:
        data["stable_seconds"] = stable_seconds
    try:
        params = WatchParams(**data)
    except ValueError as exc:
        raise ConfigError(f"watch: {str(exc).splitlines()[-1].strip()}") from None

    def say(kind: str, text: str, **fields: object) -> None:
        if as_json:
            print(json.dumps({"event": kind, **fields}), flush=True)
        else:
            console.print(text, highlight=False)

    def on_watch(ev: WatchEvent) -> None:
        style = {"slide": "green", "done": "green", "duplicate": "yellow",
                 "grouped": "cyan"}.get(ev.kind, "red")
        say(ev.kind, f"[{style}]{ev.kind}[/] {ev.path}" + (f" — {ev.reason}" if ev.reason else ""),
            path=ev.path, slide_id=ev.slide_id, reason=ev.reason)

    def on_service(ev) -> None:  # noqa: ANN001  (daemon.service.Event)
        if ev.kind == "slide_finished":
            why = ev.data.get("stopped_because")
            say("counted", f"[green]counted[/] {ev.name}: {ev.counted} cells ({why})",
                slide_id=ev.slide_id, name=ev.name, counted=ev.counted, stopped_because=why,
                error=ev.data.get("error"))

    # The service gets no watch folders of its own: this command's watcher is the only one.
    service = Service(cfg.model_copy(update={"watch": params.model_copy(update={"folders": ()})}),
                      config, on_event=on_service)
    watcher = FolderWatcher(params, service.store, target=cfg.acquisition.target,
                            taxonomy=cfg.taxonomy, detect=cfg.detect, on_event=on_watch)
    try:
        if once:
            while True:  # the backlog: passes until no file is waiting to settle
                watcher.scan_retrying()
                if not watcher.waiting():
                    break
                time.sleep(min(0.5, params.stable_seconds / 4 + 0.05))
            service.run(exit_when_idle=True)
            watcher.scan_retrying()  # settle: files of finished slides become done
            return
        if not as_json:
            err_console.print(f"watching {folder} (Ctrl-C to stop)")
        service.install_signal_handlers()
        watcher.start()
        service.run()
    finally:
        watcher.stop()
        service.close()
