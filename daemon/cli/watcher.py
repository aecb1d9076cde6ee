"""marrowcount watcher commands: ``watch`` runs the scanner-folder watcher in the foreground."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Optional

import typer

from daemon.cli.app import app, console, err_console
from daemon.config import load_config
from pipeline.errors import ConfigError

ConfigOpt = typer.Option(None, "--config", "-c", help="Lab config YAML over the defaults.")


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
    stable_seconds: Optional[float] = typer.Option(
        None, "--stable-seconds", help="Size and mtime unchanged this long = file complete."),
    once: bool = typer.Option(
        False, "--once", help="Process what is there (backlog), count it, then exit."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per event on stdout."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Watch FOLDER in the foreground and count each new slide into the store.

    Stop with Ctrl-C: the field being counted is finished and committed; the next run
    resumes the slide at the following field.
    """
    from daemon.cli.analysis import load_analyzer
    from daemon.store import Store
    from drivers.folder import FolderWatcher, WatchEvent, WatchParams, count_folder_slides
    from pipeline.analyze import analyze_field

    if not folder.is_dir():
        raise ConfigError(f"watch folder {folder} does not exist or is not a folder")
    cfg = load_config(config)
    entry: dict[str, object] = {"path": str(folder.resolve())}
    for key, value in (("um_per_px", um_per_px), ("grouping", grouping), ("pattern", pattern),
                       ("marker", marker), ("target", target)):
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

    classifier = load_analyzer(cfg)
    store = Store.from_params(cfg.store, lambda p: cfg.resolve(p))
    stop = threading.Event()
    wake = threading.Event()

    def report(ev: WatchEvent) -> None:
        if as_json:
            print(json.dumps({"event": ev.kind, "path": ev.path, "slide_id": ev.slide_id,
                              "reason": ev.reason}), flush=True)
        else:
            style = {"slide": "green", "done": "green", "duplicate": "yellow"}.get(ev.kind, "red")
            console.print(f"[{style}]{ev.kind}[/] {ev.path}" + (f" — {ev.reason}" if ev.reason else ""),
                          highlight=False)

    def finished(slide_id: int, why: str) -> None:
        counts = store.counts(slide_id)
        if as_json:
            print(json.dumps({"event": "counted", "slide_id": slide_id, "stopped_because": why,
                              "counts": counts}), flush=True)
        else:
            console.print(f"slide {slide_id}: {why}, {sum(counts.values())} cells", highlight=False)

    watcher = FolderWatcher(params, store, submit=lambda _id: wake.set(),
                            target=cfg.acquisition.target, taxonomy=cfg.taxonomy,
                            detect=cfg.detect, on_event=report)

    def analyze(rgb, um):  # noqa: ANN001, ANN202
        return analyze_field(rgb, um, classifier, cfg.detect, cfg.analysis)

    def count() -> None:
        count_folder_slides(store, analyze, cfg.acquisition.quality, cfg.detect,
                            worker=f"watch@{socket.gethostname()}", should_stop=stop.is_set,
                            on_done=finished)

    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        if once:
            # Backlog only: passes until no file is waiting to settle, then count everything.
            while True:
                watcher.scan_once()
                if not watcher.waiting() or stop.is_set():
                    break
                time.sleep(min(0.5, params.stable_seconds / 4 + 0.05))
            count()
            return
        if not as_json:
            err_console.print(f"watching {folder} (Ctrl-C to stop)")
        watcher.start()
        wake.set()  # slides queued before this run (interrupted counts) are resumed first
        while not stop.is_set():
            if wake.wait(1.0):
                wake.clear()
                count()
    except KeyboardInterrupt:
        stop.set()
    finally:
        watcher.stop()
        signal.signal(signal.SIGTERM, previous)
        store.close()
