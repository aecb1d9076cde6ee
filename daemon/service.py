"""The long-running service: slide queue, acquisition loop, resume, signals.

The queue is the ``slides`` table: ``marrowcount submit`` and the folder watcher insert
``queued`` rows; a daemon claims the oldest one (``queued -> acquiring``, a compare-and-set,
so daemons sharing a PostgreSQL store never take the same slide), counts it field by field
with ``drivers.acquisition.count_slide`` and commits every field before the next is counted.
It ends ``awaiting_review`` (target reached, counting area used up, adaptive stop) or
``failed`` (with the reason).

Resume: a slide this daemon left ``acquiring`` (killed, power cut, SIGTERM) is taken up
first on the next start, from the field after the last committed one, with the frozen field
plan stored in ``Slide.plan`` and the committed count. A field is committed whole or not at
all, so nothing is lost or counted twice.

Signals: SIGTERM/SIGINT finish the current field and exit; SIGHUP reloads the config (from
the next slide on). Logs are JSON lines on stderr.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, field_validator
from sqlalchemy.exc import SQLAlchemyError

from daemon.case import CaseInfo
from daemon.metrics import Metrics
from daemon.notify import Notifier
from daemon.store import RED_CELLS, Store, StoreError
from pipeline.errors import ConfigError, MarrowError
from pipeline.detect import check_field_scale
from pipeline.params import Params

log = logging.getLogger("marrowcount.service")

PLAN_VERSION = 1
FOLDER_AWAY_MAX_S = 3600.0
"""How long a folder slide waits for its watch folder to come back before it fails."""


class ServiceParams(Params):
    """The ``service:`` config section (defaults in config/default.yaml)."""

    poll_seconds: float = Field(gt=0, description="how often an idle daemon looks at the queue")
    instrument: str = Field(description="this daemon's name in a shared store; '' = host name")
    metrics_host: str
    metrics_port: int = Field(ge=0, le=65535, description="Prometheus /metrics port; 0 = off")
    commit_retries: int = Field(ge=0, description="retries of a field whose commit failed")
    commit_backoff_s: float = Field(ge=0, description="first retry delay; doubles each retry")
    retry_slide_after_s: float = Field(
        ge=0, description="after the last retry: pause the slide this long, then resume it")
    log_format: Literal["json", "text"]
    log_level: Literal["debug", "info", "warning", "error"]
    webhook_url: str = Field(pattern=r"(?i)^(https?://\S+)?$",
                             description="POST slide events here as JSON (an http:// or "
                             "https:// URL); '' = off")
    webhook_events: tuple[Literal["slide_started", "slide_finished", "slide_paused",
                                  "pixel_size"], ...] = Field(
        description="which events go to webhook_url")

    @field_validator("webhook_url", mode="before")
    @classmethod
    def _strip_url(cls, v: Any) -> Any:
        return v.strip() if isinstance(v, str) else v


class ServiceError(MarrowError):
    """The daemon cannot start or a submission is refused."""


class MicroscopeNotReady(MarrowError):
    """The microscope of a slide cannot be opened now (a config or adapter that does not
    load, a camera unplugged, a pixel size no field can be counted at): the slide waits."""


class FieldCommitError(MarrowError):
    """A field could not be committed after every retry (e.g. the disk stays full)."""


@dataclass(frozen=True)
class Event:
    """Progress for a caller (the demo's progress bar): ``kind`` and plain data."""

    kind: Literal["slide_started", "field", "slide_finished", "slide_paused", "pixel_size",
                  "idle"]
    slide_id: int
    name: str
    counted: int
    target: int
    data: dict[str, Any]


# -- submission ----------------------------------------------------------------------------


def submit_slide(
    store: Store,
    cfg: Any,
    path: str | Path,
    *,
    name: str | None = None,
    target: int | None = None,
    um_per_px: float | None = None,
    case: CaseInfo | None = None,
    by: str = "system",
) -> int:
    """Queue a virtual slide (a slide image file) or a microscope slide (a Micro-Manager
    ``.cfg``) with its ``case`` (patient, specimen) if known; returns the slide id. The
    submission, with the case as entered, is audited (``submit``) under ``by``.
    ``um_per_px`` overrides the file's or the microscope's pixel size. Refuses a file that
    does not exist or cannot be read, and an image file that states no pixel size when none
    is given (the daemon could never count it), and a microscope slide while another on the
    same microscope is still queued or being counted (its stage holds one slide: the second
    would be counted on the first one's glass, under another patient's name)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise ServiceError(f"{p}: no such slide file; nothing was queued")
    p = p.resolve()
    n = cfg.acquisition.target if target is None else int(target)
    if n <= 0:
        raise ServiceError(f"target must be a positive number of cells, got {n}")
    um = um_per_px
    if p.suffix.lower() == ".cfg":
        kind = "microscope"
        busy = [s for s in store.slides(("queued", "acquiring"))
                if s.source == "microscope" and s.source_ref == str(p)]
        if busy:
            raise ServiceError(
                f"slide {busy[0].name!r} on the microscope of {p.name} is still "
                f"{busy[0].status}: submit the next slide once it is counted and the glass "
                f"is changed, or cancel it (marrowcount cancel {busy[0].name} --reason …); "
                "nothing was queued")
    else:
        from drivers.slide_image import open_slide

        kind = "virtual"
        slide = open_slide(p)  # ImageError (one clear line) for a broken or unknown file
        try:
            um = um_per_px or slide.um_per_px
        finally:
            slide.close()
        if not um:
            raise ServiceError(f"{p}: the file states no pixel size; give --um-per-px "
                               "(nothing was queued)")
    if um is not None:
        # A size no field could be counted at would only reach review as 0 cells.
        um = check_field_scale(um, cfg.detect,
                               "--um-per-px" if um_per_px is not None else f"{p.name}: pixel size")
    sid = store.create_slide(name or p.stem, kind, str(p), n, cfg.taxonomy, um_per_px=um,
                             case=case)
    # Who tied this glass to this patient, and when: later case edits are audited too.
    store.audit(by, "submit", sid, after={"source": str(p), "target": n, "um_per_px": um,
                                          "case": case.stored() if case is not None else None})
    log.info("slide submitted", extra={"data": {"slide": sid, "name": name or p.stem,
                                                "source": kind, "target": n}})
    return sid


def daemon_lock(data_dir: Path, instrument: str) -> Any:
    """The open file whose exclusive lock says the daemon of ``instrument`` is running; held
    for as long as the file stays open. ServiceError when another process holds it."""
    path = Path(data_dir) / f".daemon-{_safe(instrument)}.lock"
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        raise ServiceError(f"another marrowcount daemon for instrument {instrument!r} is "
                           f"running (lock {path})") from None
    return fh


def cancel_slide(store: Store, ref: int | str, who: str, reason: str) -> Any:
    """End a queued slide, a started one whose daemon is not running (stopped while the
    slide waited on a fault, or killed), or a counted one awaiting review that must not be
    reported (the wrong glass, a rejected specimen: signing would issue a report), as
    ``failed`` with ``reason``; audited as ``cancel``. Its counted fields stay on record.
    Returns the slide as it was.

    A started slide's daemon may be counting or retrying it at any moment: it is refused
    while that daemon holds its lock, and the lock is held here until the slide is failed,
    so no daemon starts on it meanwhile."""
    slide = store.slide(ref)
    if not reason.strip():
        raise ServiceError("say why the slide is cancelled (--reason)")
    if slide.status not in ("queued", "acquiring", "awaiting_review"):
        raise ServiceError(f"slide {slide.name!r} is {slide.status.replace('_', ' ')}: only a "
                           "queued, started or unsigned slide can be cancelled"
                           + (" (a signed one is reopened, then cancelled)"
                              if slide.status == "signed" else ""))
    held = None
    if slide.status == "acquiring":
        try:
            held = daemon_lock(store.data_dir, slide.worker or "")
        except ServiceError:
            raise ServiceError(
                f"slide {slide.name!r} is with the running daemon of {slide.worker!r}, "
                "which counts or retries it: stop that daemon first (systemctl stop "
                "marrowcount), then cancel it") from None
    try:
        if not store.cancel(slide.id, slide.status, who, reason.strip()):
            raise ServiceError(f"slide {slide.name!r} changed meanwhile; nothing was cancelled")
    finally:
        if held is not None:
            held.close()
    return slide


def _watch_settings(cfg: Any) -> tuple[Any, ...]:
    """What the folder watcher is built from (``Service._start_watcher``)."""
    return cfg.watch, cfg.acquisition.target, cfg.taxonomy, cfg.detect


def _file_identity(path: Path) -> tuple[int, int] | None:
    """Size and modification time of a file (None when it cannot be seen): a file copied over
    another changes at least one of them."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


# -- the service ---------------------------------------------------------------------------


class Service:
    """One daemon: owns the store, the metrics endpoint and the model; counts slides.

    ``cfg`` is a loaded Config; ``config_path`` is re-read on SIGHUP.
    """

    def __init__(self, cfg: Any, config_path: str | Path | None = None,
                 on_event: Callable[[Event], None] | None = None,
                 store: Store | None = None) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.instrument = cfg.service.instrument or socket.gethostname()
        self.store = store if store is not None else Store.from_params(cfg.store, cfg.resolve)
        self._lock_fh = self._lock()
        self.metrics = Metrics()
        self.notifier = Notifier()
        self.on_event = on_event or (lambda e: None)
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by a stop request or a newly queued slide
        self._reload = False
        self._watcher: Any = None
        self._classifier: Any = None
        self._classifier_key: tuple[Any, ...] = ()
        self._model_sha = ""
        self._model_error: str | None = None
        """Why the model last failed to load; no new slide is claimed until it loads again."""
        self._commit_error: tuple[int, str] | None = None
        """The slide whose field could not be committed, and why (a full disk, a database
        refusing writes): it would fail alike on every slide, so no other is claimed until
        one commits, or until that slide stops acquiring here (failed, cancelled)."""
        self._webhook: Any = None
        self._paused_until: dict[int, float] = {}
        self._away_since: dict[int, float] = {}
        """When each folder slide's watch folder was first found away (``_folder_away``)."""
        # Slides paused again for the reason they were paused before: a fault that persists.
        self._repeated: set[int] = set()
        self._exit_when_idle = False
        self._only: int | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def _lock(self) -> Any:
        try:
            fh = daemon_lock(self.store.data_dir, self.instrument)
        except ServiceError:
            self.store.close()
            raise
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        return fh

    def close(self) -> None:
        if self._webhook is not None:
            self._webhook.close()
            self._webhook = None
        self.metrics.close()
        self.store.close()
        if self._lock_fh is not None:
            self._lock_fh.close()
            self._lock_fh = None

    def request_stop(self) -> None:
        """Finish the current field, then return from ``run`` (what SIGTERM does)."""
        self._stop.set()
        self._wake.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self._on_stop_signal("SIGTERM"))
        signal.signal(signal.SIGINT, lambda *_: self._on_stop_signal("SIGINT"))
        signal.signal(signal.SIGHUP, lambda *_: self._on_hup())

    def _on_stop_signal(self, name: str) -> None:
        log.info("%s: finishing the current field, then exiting", name)
        self.request_stop()

    def _on_hup(self) -> None:
        self._reload = True
        self._wake.set()

    def _start_watcher(self) -> Any:
        """The folder watcher for ``watch.folders`` in the config (None when there are none);
        it queues scanned slides in the store and wakes the idle loop."""
        if not self.cfg.watch.folders:
            return None
        from drivers.folder import FolderWatcher

        def on_watch(ev: Any) -> None:
            level = (logging.INFO if ev.kind in ("slide", "done", "duplicate", "grouped")
                     else logging.WARNING)
            if ev.kind in ("quarantined", "refused"):
                self.metrics.error("quarantine")
            log.log(level, "watch: %s %s", ev.kind, ev.path, extra={"data": {
                "path": ev.path, "slide": ev.slide_id, "reason": ev.reason}})

        watcher = FolderWatcher(self.cfg.watch, self.store, lambda _sid: self._wake.set(),
                                target=self.cfg.acquisition.target, taxonomy=self.cfg.taxonomy,
                                detect=self.cfg.detect, on_event=on_watch)
        watcher.start()
        return watcher

    def run(self, *, exit_when_idle: bool = False, only_slide: int | None = None) -> int:
        """Count slides until stopped (or, with ``exit_when_idle``, until the queue is empty).
        With ``only_slide`` just that slide is counted. Returns 0."""
        self._only = only_slide
        self._exit_when_idle = exit_when_idle
        self._analyzer()  # a missing or mismatched model is an error at start, not per slide
        try:
            self.metrics.serve(self.cfg.service.metrics_port, self.cfg.service.metrics_host)
        except OSError as exc:  # counting matters more than the metrics endpoint
            log.error("metrics endpoint %s:%d unavailable: %s", self.cfg.service.metrics_host,
                      self.cfg.service.metrics_port, exc.strerror)
        self.notifier.ready(f"idle on {self.instrument}")
        log.info("daemon started", extra={"data": {
            "instrument": self.instrument, "pid": os.getpid(),
            "store": self.store.engine.url.render_as_string(hide_password=True),
            "data_dir": str(self.store.data_dir)}})
        self._watcher = self._start_watcher()
        try:
            while not self._stop.is_set():
                if self._reload:
                    self._reload_config()
                slide = self._next_slide()
                self.metrics.queue_length.set(len(self.store.slides(["queued", "acquiring"])))
                if slide is None:
                    if exit_when_idle and set(self._paused_until) <= self._repeated:
                        # Only slides whose fault persisted through a retry are left: waiting
                        # on them would never end (`demo`, `watch --once`, --exit-when-idle).
                        if self._repeated:
                            log.warning("exiting with %d slide(s) waiting on a fault that "
                                        "persists; a daemon retries them",
                                        len(self._repeated))
                        break
                    self.notifier.status(f"idle on {self.instrument}")
                    self.notifier.wait(self._wake, self._idle_wait())
                    self._wake.clear()
                    continue
                self._count(slide)
        finally:
            if self._watcher is not None:
                self._watcher.stop()
                self._watcher = None
            self.notifier.stopping()
            log.info("daemon stopped", extra={"data": {"instrument": self.instrument}})
        return 0

    def _idle_wait(self) -> float:
        wait = self.cfg.service.poll_seconds
        if self._paused_until:
            wait = min(wait, max(0.05, min(self._paused_until.values()) - time.monotonic()))
        return wait

    def _reload_config(self) -> None:
        from daemon.config import load_config

        self._reload = False
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
        except ConfigError as exc:
            log.error("config reload failed; keeping the running config: %s", exc)
            self.metrics.error("config")
        else:
            if new.store != self.cfg.store:
                log.warning("store settings changed: they apply after a restart")
            fixed = ("metrics_host", "metrics_port", "instrument")
            if any(getattr(new.service, k) != getattr(self.cfg.service, k) for k in fixed):
                log.warning("service.metrics_host, metrics_port and instrument changes apply "
                            "after a restart")
            old, self.cfg = self.cfg, new
            log.info("config reloaded", extra={"data": {"path": str(self.config_path)}})
            if _watch_settings(old) != _watch_settings(new):
                # The watcher records target and taxonomy on the slides it queues: it must
                # see the new values too (the next file dropped, not only after a restart).
                if self._watcher is not None:
                    self._watcher.stop()
                    self._watcher = None
                try:
                    self._watcher = self._start_watcher()
                except Exception as exc:  # e.g. the inotify limit: counting queued slides goes on
                    log.error("folder watcher not restarted (next reload tries again): %s", exc)
                    self.metrics.error("watcher")
                else:
                    log.info("folder watcher restarted with the reloaded settings")
        self.notifier.ready(f"idle on {self.instrument}")

    # -- queue ----------------------------------------------------------------------------

    def _next_slide(self) -> Any:
        now = time.monotonic()
        self._paused_until = {k: t for k, t in self._paused_until.items() if t > now}
        mine = [s for s in self.store.slides(["acquiring"]) if s.worker in (None, self.instrument)]
        for s in mine:
            if (s.id not in self._paused_until and self._only in (None, s.id)
                    and not (self._exit_when_idle and s.id in self._repeated)):
                return s
        if self._commit_error and self._commit_error[0] not in {s.id for s in mine}:
            # Its retry ended without a commit (the file went, the slide was cancelled):
            # nothing now says the disk is still full, and the queue must not wait for ever.
            log.info("queue no longer held: the slide that could not be written stopped "
                     "acquiring", extra={"data": {"slide": self._commit_error[0]}})
            self._commit_error = None
        if self._model_error or self._commit_error:
            return None  # a broken model or a full disk would only pause every queued slide
        if self._only is not None:
            return self.store.claim(self._only, self.instrument)
        return self.store.claim_next(self.instrument)

    # -- counting one slide ---------------------------------------------------------------

    def _count(self, slide: Any) -> None:
        from drivers.acquisition import HardwareFault, count_slide
        from pipeline.stats import adaptive_stop_reason

        prog = self.store.progress(slide.id)
        ctx = {"slide": slide.id, "name": slide.name}
        # A virtual or microscope slide's plan is frozen when it is first counted; a folder
        # slide's comes with it from the watcher, so only its fields say it was begun.
        resumed = prog.n_fields > 0 or (slide.plan is not None and slide.source != "folder")
        log.info("slide resumed" if resumed else "slide started",
                 extra={"data": {**ctx, "from_field": prog.next_index, "counted": prog.counted,
                                 "target": slide.target, "source": slide.source}})
        self._emit("slide_started", slide, prog.counted, resumed=resumed)
        try:
            analyze, method = self._analyzer()
        except MarrowError as exc:
            # A damaged or mismatched model file (a new checkpoint half copied, then SIGHUP)
            # stops every slide alike: this one waits, unfailed, and no other is claimed
            # until the file is fixed; people are told once, not at every retry.
            reason = f"model not loaded: {exc}"
            first, self._model_error = reason != self._model_error, reason
            self._pause(slide, prog.counted, reason, alert=first)
            return
        if self._model_error:
            log.info("model loaded again; counting goes on")
            self._model_error = None
        try:
            source, close = self._open_source(slide, prog.n_fields)
        except MicroscopeNotReady as exc:
            # The glass stays on the stage while someone mends the config or plugs the
            # camera in again: the slide waits, resumable, and people are told once.
            self._pause(slide, prog.counted, f"microscope not ready: {exc}",
                        previous=slide.error)
            return
        except MarrowError as exc:  # a stored plan that no longer fits, a pre-scan that kept none
            self._fail(slide, str(exc))
            return
        except Exception as exc:  # a bug, or a device adapter's own error type
            log.exception("cannot open slide", extra={"data": ctx})
            self._fail(slide, f"{type(exc).__name__}: {exc}")
            return
        counted = prog.counted
        adaptive: list[str] = []
        t0 = time.monotonic()
        self.metrics.slide_counted.set(counted)  # a resumed slide starts where it stood
        n_measured = self.store.red_cells([slide.id])[slide.id][1]
        to_check = n_measured < self.cfg.calibrate.check_fields  # a resumed slide was checked

        stale_error = [slide.error]

        def on_field(f: Any) -> None:
            nonlocal counted, n_measured
            self._away_since.pop(slide.id, None)  # a field read: a later outage is a new one
            measure = f.image is not None and n_measured < self.cfg.calibrate.check_fields
            if measure:
                f = self._measure_red_cells(f)
            if f.skipped_reason and f.image is not None:
                # Measured above; a skipped field's image is not kept.
                f = dataclasses.replace(f, image=None)
            if self._commit(slide, f, None if f.skipped_reason else method):
                counted += f.n_counted
                self.metrics.field_committed(f.n_counted, counted)
                if measure and RED_CELLS in f.quality:
                    n_measured += 1
                    if n_measured == self.cfg.calibrate.check_fields:
                        self._check_scale(slide, counted)
            if stale_error[0]:  # the failure noted earlier is over
                self._note(slide.id, None)
                stale_error[0] = None
            self.notifier.status(f"{slide.name}: {counted}/{slide.target} cells, field {f.index}")
            log.info("field committed", extra={"data": {
                **ctx, "field": f.index, "cells": f.n_counted, "counted": counted,
                "skipped": f.skipped_reason}})
            self._emit("field", slide, counted, field=f.index, cells=f.n_counted,
                       skipped=f.skipped_reason)
            if self.cfg.stats.adaptive_stop and counted < slide.target:
                reason = adaptive_stop_reason(self.store.counts(slide.id), self.cfg.classes,
                                              self.cfg.stats)
                if reason:
                    adaptive.append(reason)

        try:
            result = count_slide(
                source, analyze, slide.target, start_index=prog.next_index,
                counted_so_far=prog.counted, on_field=on_field,
                should_stop=lambda: self._stop.is_set() or bool(adaptive),
                # Only hardware can be mended: a scanned file's dark or blurred fields are
                # the file's, and a slide paused for them would wait for ever.
                fault_after=(self.cfg.acquisition.quality.fault_after_fields
                             if slide.source == "microscope" else 0),
            )
        except FieldCommitError as exc:
            self._commit_error = (slide.id, str(exc))
            log.warning("queue held: no other slide is started until a field of this one can "
                        "be written", extra={"data": {**ctx, "error": str(exc)}})
            self._pause(slide, counted, str(exc), previous=stale_error[0])
            return
        except HardwareFault as exc:
            self._pause(slide, counted, f"hardware fault: {exc}", previous=stale_error[0])
            return
        except MarrowError as exc:
            self._fail(slide, str(exc))
            return
        except Exception as exc:  # a bug or a driver fault: the slide fails, the daemon goes on
            log.exception("slide failed", extra={"data": ctx})
            self._fail(slide, f"{type(exc).__name__}: {exc}")
            return
        finally:
            close()
            self.metrics.slide_counted.set(0)  # no slide is being counted
        if (to_check and 0 < n_measured < self.cfg.calibrate.check_fields
                and (result in ("target_reached", "area_exhausted") or adaptive)):
            self._check_scale(slide, counted)  # a slide of fewer fields than check_fields
        self._finish(slide, result, counted, adaptive[0] if adaptive else None,
                     time.monotonic() - t0)

    def _finish(self, slide: Any, result: str, counted: int, adaptive: str | None,
                seconds: float) -> None:
        ctx = {"slide": slide.id, "name": slide.name, "counted": counted,
               "target": slide.target, "seconds": round(seconds, 2)}
        if result == "stopped" and adaptive is None:
            log.info("slide interrupted; it resumes at the next start", extra={"data": ctx})
            self._emit("slide_paused", slide, counted, reason="stopped")
            return
        if result.startswith("failed"):
            self._fail(slide, result.removeprefix("failed:").strip() or result)
            return
        because = {"target_reached": "target_reached", "area_exhausted": "area_exhausted",
                   "stopped": "adaptive_stop"}[result]
        self.store.set_status(slide.id, "awaiting_review", stopped_because=because)
        if adaptive:
            self.store.audit("marrowcount", "adaptive_stop", slide.id, after={"reason": adaptive})
        self.metrics.slides.labels(outcome=because).inc()
        log.info("slide counted", extra={"data": {**ctx, "stopped_because": because}})
        self._emit("slide_finished", slide, counted, stopped_because=because)

    def _measure_red_cells(self, f: Any) -> Any:
        """The field with its red-cell diameters (µm through its stated pixel size) added to
        its quality record, where the report and a resumed slide find them."""
        from pipeline.calibrate import rbc_diameters

        try:
            d = rbc_diameters(f.image, self.cfg.calibrate) * f.um_per_px
        except Exception as exc:  # a check that only warns must never fail a slide
            log.warning("red cells of field %d not measured: %s", f.index, exc)
            return f
        return dataclasses.replace(f, quality={**f.quality, RED_CELLS: np.round(d, 2).tolist()})

    def _check_scale(self, slide: Any, counted: int) -> None:
        from daemon.report import pixel_size_checks

        found = pixel_size_checks(self.store, [slide.id], self.cfg)[slide.id]
        if found is None:
            return
        data = {"slide": slide.id, "name": slide.name, **found}
        if found["disagrees"]:
            self.metrics.error("pixel_size")
            log.warning("pixel size of %s: stated %.4g µm/px, but its red cells measure %.4g "
                        "(%d cells in %d fields); every size in µm is off", slide.name,
                        found["stated_um_per_px"], found["estimate_um_per_px"],
                        found["red_cells"], found["fields"], extra={"data": data})
            self._emit("pixel_size", slide, counted, **found)
        else:
            log.info("pixel size checked", extra={"data": data})

    def _pause(self, slide: Any, counted: int, reason: str, alert: bool | None = None,
               previous: str | None = None) -> None:
        """Leave the slide where it is and retry it after ``service.retry_slide_after_s``;
        ``alert``: log it as an error and send it to the webhook. By default a slide is
        alerted unless ``previous`` (the note it carried) was a pause of the same kind: the
        text before the reason's first colon ("hardware fault", "field 4 failed"), as a dim
        lamp or a full disk reads a little differently at each retry and is still one fault."""
        if alert is None:
            kind = reason.split(":", 1)[0] + ":"
            alert = not (previous or "").startswith(kind)
        pause = self.cfg.service.retry_slide_after_s
        self._paused_until[slide.id] = time.monotonic() + pause
        (self._repeated.discard if alert else self._repeated.add)(slide.id)
        self._note(slide.id, f"{reason}; retrying in {pause:g} s")
        log.log(logging.ERROR if alert else logging.INFO, "slide paused: %s", reason,
                extra={"data": {"slide": slide.id, "name": slide.name}})
        self._emit("slide_paused", slide, counted, notify=alert, reason=reason)

    def _folder_away(self, slide: Any) -> str | None:
        """For a scanner-folder slide whose file is missing: the folder it came through
        that is away (``drivers.folder.folder_away``: a share unmounted, renamed or briefly
        away), else None (the file, or its case folder, was removed from a share that is
        there). Failing such a slide had counted its file again, as a second slide, once
        the share was back."""
        from drivers.folder import folder_away

        if slide.source != "folder":
            return None
        roots = [Path(f.path) for f in self.cfg.watch.folders]
        for f in (slide.plan or {}).get("files", []):
            path = Path(f.get("path", ""))
            if path.exists():
                continue
            root = next((r for r in roots if path.is_relative_to(r)), path.parent)
            if (away := folder_away(path, root)) is not None:
                return str(away)
        return None

    def _fail(self, slide: Any, reason: str) -> None:
        if away := self._folder_away(slide):
            since = self._away_since.setdefault(slide.id, time.monotonic())
            if time.monotonic() - since < FOLDER_AWAY_MAX_S:
                self._pause(slide, self.store.progress(slide.id).counted,
                            f"scanner folder not reachable: {away} is gone or empty; the "
                            f"slide waits for it ({reason})", previous=slide.error)
                return
            # Away that long is no blip: a slide must not hold its place (and a queue held
            # by a full disk) for ever.
            reason = (f"{reason} (its scanner folder {away} was away for over "
                      f"{FOLDER_AWAY_MAX_S / 3600:g} h)")
        self._away_since.pop(slide.id, None)
        self.store.set_status(slide.id, "failed", error=reason[:2000], stopped_because="failed")
        self.metrics.error("slide")
        self.metrics.slides.labels(outcome="failed").inc()
        log.error("slide failed: %s", reason, extra={"data": {"slide": slide.id,
                                                              "name": slide.name}})
        self._emit("slide_finished", slide, self.store.progress(slide.id).counted,
                   stopped_because="failed", error=reason)

    def _commit(self, slide: Any, f: Any, method: dict[str, Any] | None) -> bool:
        """Commit a field, retrying with back-off when its files or rows cannot be written.
        Nothing of a failed attempt is kept; after the last retry FieldCommitError."""
        p = self.cfg.service
        delay = p.commit_backoff_s
        for attempt in range(p.commit_retries + 1):
            try:
                ok = self.store.commit_field(slide.id, f, method)
                if attempt:
                    self._note(slide.id, None)
                self._commit_error = None
                return ok
            except (OSError, SQLAlchemyError, StoreError) as exc:
                # Where it failed too: the database, or which file of the data folder.
                if isinstance(exc, OSError) and exc.strerror:
                    why = exc.strerror + (f" ({self._where(exc.filename)})"
                                          if exc.filename else "")
                else:
                    why = (("database: " if isinstance(exc, SQLAlchemyError) else "")
                           + (str(exc).splitlines() or [type(exc).__name__])[0])
                self.metrics.error("commit")
                log.warning("field %d of %s failed to commit (%s); attempt %d of %d",
                            f.index, slide.name, why, attempt + 1, p.commit_retries + 1,
                            extra={"data": {"slide": slide.id, "field": f.index}})
                self._note(slide.id, f"field {f.index} failed: {why}; retrying")
                if attempt == p.commit_retries or self.notifier.wait(self._stop, delay):
                    raise FieldCommitError(f"field {f.index} failed: {why}") from None
                delay *= 2
        raise AssertionError("unreachable")

    def _where(self, filename: Any) -> str:
        """A failed file named by its folder: the data folder for any file in it (a staging
        name differs at every retry, and a repeated pause is known by its reason)."""
        path = Path(os.fsdecode(filename))
        data = self.store.data_dir
        return f"data folder {data}" if path.is_relative_to(data) else str(path)

    def _note(self, slide_id: int, text: str | None) -> None:
        try:
            self.store.note_error(slide_id, text)
        except SQLAlchemyError:  # the database may be on the full disk too
            pass

    def _emit(self, kind: str, slide: Any, counted: int, notify: bool = True,
              **data: Any) -> None:
        try:
            self.on_event(Event(kind, slide.id, slide.name, counted, slide.target, data))  # type: ignore[arg-type]
        except Exception:  # a display callback must never stop counting
            log.exception("progress callback failed")
        p = self.cfg.service
        if self._webhook is not None and self._webhook.url != p.webhook_url:
            # The URL changed with a config reload: the old one drains on its own thread.
            threading.Thread(target=self._webhook.close, daemon=True).start()
            self._webhook = None
        if notify and p.webhook_url and kind in p.webhook_events:
            from daemon.webhook import Webhook, event_text

            if self._webhook is None:
                self._webhook = Webhook(
                    p.webhook_url, on_drop=lambda n: self.metrics.errors.labels(
                        kind="webhook").inc(n))
            self._webhook.post({
                "event": kind, "text": event_text(kind, slide.name, counted, slide.target,
                                                  self.instrument, data),
                "slide": slide.name, "slide_id": slide.id, "instrument": self.instrument,
                "counted": counted, "target": slide.target,
                "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **data})

    # -- parts ----------------------------------------------------------------------------

    def _analyzer(self) -> tuple[Callable[[Any, float], Any], dict[str, Any]]:
        """The field analysis for the next slide and the method it stands for. The model is
        loaded again when its file, the classifier settings or the taxonomy changed (a new
        checkpoint copied over the old one, then SIGHUP). Raises a MarrowError when it
        cannot be loaded."""
        from daemon.provenance import analysis_method, file_sha256
        from pipeline.analyze import analyze_field
        from pipeline.classify import load_classifier
        from pipeline.errors import CheckpointError

        cfg = self.cfg
        path = cfg.resolve(cfg.classifier.checkpoint)
        identity = _file_identity(path)
        key = (path, identity, cfg.classifier.model_dump_json(), tuple(cfg.classes.model_names))
        if self._classifier is None or self._classifier_key != key:
            t0 = time.monotonic()
            try:
                sha = file_sha256(path) if identity else ""  # missing: load_classifier says so
            except OSError as exc:
                raise CheckpointError(f"{path}: cannot be read ({exc.strerror})") from None
            clf = load_classifier(path, cfg.classes, params=cfg.classifier)
            if _file_identity(path) != identity:
                raise CheckpointError(f"{path}: the file changed while it was loaded")
            self._classifier, self._classifier_key, self._model_sha = clf, key, sha
            loaded = time.monotonic()
            clf.warm_up()
            log.info("model loaded", extra={"data": {
                "checkpoint": str(path), "sha256": sha[:16], "seconds": round(loaded - t0, 2),
                "warm_up_seconds": round(time.monotonic() - loaded, 2),
                "precision": clf.precision}})
            if clf.precision_note:
                log.warning("classifier runs %s, not %s: %s", clf.precision,
                            cfg.classifier.precision, clf.precision_note)
        clf = self._classifier

        def analyze(rgb: Any, um_per_px: float) -> Any:
            return analyze_field(rgb, um_per_px, clf, cfg.detect, cfg.analysis)

        return analyze, analysis_method(cfg, path.name, self._model_sha, clf.precision,
                                        clf.um_per_px)

    def _open_source(self, slide: Any, n_committed: int) -> tuple[Any, Callable[[], None]]:
        """The slide's FieldSource and a function that releases it. A new slide's field plan
        is frozen in the store first; a resumed slide follows its stored plan."""
        cfg = self.cfg
        if slide.source == "folder":
            from drivers.wsi_fields import source_from_plan

            if not slide.plan:
                raise ServiceError(f"folder slide {slide.name!r} has no field plan")
            return source_from_plan(slide.plan, cfg.acquisition.quality, cfg.detect), lambda: None
        from drivers.micromanager import MicroscopeFieldSource, open_microscope

        if slide.source == "virtual":
            scope = open_microscope(cfg.acquisition, virtual_slide=slide.source_ref,
                                    um_per_px=slide.um_per_px)
        else:
            try:
                scope = open_microscope(cfg.acquisition, mm_config=slide.source_ref,
                                        um_per_px=slide.um_per_px)
                # The config's pixel size, never range-checked when the slide was submitted
                # (a camera pixel not divided by the magnification reads as 6.45 µm/px).
                try:
                    check_field_scale(scope.um_per_px, cfg.detect,
                                      f"{Path(slide.source_ref).name}: pixel size")
                except MarrowError:
                    scope.close()
                    raise
            except Exception as exc:  # MarrowError, or a device adapter's own error type
                raise MicroscopeNotReady(
                    str(exc) if isinstance(exc, MarrowError)
                    else f"{type(exc).__name__}: {exc}") from exc
        try:
            try:
                plan = self._stage_plan(slide, scope)
            except (ServiceError, KeyboardInterrupt):
                raise  # a stored plan that no longer fits this microscope: resubmit
            except Exception as exc:
                if slide.source != "microscope":
                    raise
                # The pre-scan's objective group missing from the .cfg, a lamp dark at 10x,
                # an adapter failing: mended while the glass stays on the stage.
                raise MicroscopeNotReady(
                    str(exc) if isinstance(exc, MarrowError)
                    else f"{type(exc).__name__}: {exc}") from exc
            source = MicroscopeFieldSource(scope, plan, cfg.acquisition, cfg.detect)
            if n_committed:
                # Start each focus search where the committed neighbours were in focus, as
                # the uninterrupted run would have.
                for f in self.store.fields(slide.id)[-64:]:
                    if f.stage_z is not None and f.skipped_reason is None:
                        source.remember_focus(f.stage_x, f.stage_y, f.stage_z)
        except BaseException:
            scope.close()
            raise
        return source, scope.close

    def _stage_plan(self, slide: Any, scope: Any) -> Any:
        from drivers.plan import FieldPlan

        p = slide.plan
        if p:
            if p.get("driver") != "stage" or p.get("version") != PLAN_VERSION:
                raise ServiceError(f"slide {slide.name!r}: stored plan is not a stage plan")
            if abs(p["um_per_px"] - scope.um_per_px) > 1e-9 * max(1.0, scope.um_per_px):
                raise ServiceError(
                    f"slide {slide.name!r} was planned at {p['um_per_px']} µm/px but the "
                    f"microscope now gives {scope.um_per_px} µm/px; resubmit it")
            return FieldPlan(tuple(tuple(xy) for xy in p["positions"]), tuple(p["fov_um"]),
                             tuple(tuple(xy) for xy in p["area"]), p.get("prescan"))
        plan = scope.plan(self.cfg.acquisition.area_um, self.cfg.detect)
        self.store.set_plan(slide.id, {
            "driver": "stage", "version": PLAN_VERSION, "um_per_px": scope.um_per_px,
            "positions": [list(xy) for xy in plan.positions], "fov_um": list(plan.fov_um),
            "area": [list(xy) for xy in plan.area], "prescan": plan.prescan,
        }, scope.um_per_px)
        return plan


# -- logging -------------------------------------------------------------------------------


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, and the record's ``data``."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "data", None) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    """A line for people: the message, then the record's data as key=value (the slide, field
    and counts a JSON line carries, which a plain format string drops)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        data = getattr(record, "data", None)
        if not data:
            return line
        head, nl, rest = line.partition("\n")  # a traceback stays below the line
        return head + "".join(f" {k}={v}" for k, v in data.items()) + nl + rest


def setup_logging(fmt: str, level: str, stream: Any = None) -> None:
    """One handler for every line on stderr, so with ``json`` every line is JSON (journald):
    marrowcount's own records at ``level``; everything else at WARNING and up, through the
    root logger: drivers, pipeline, libraries (tifffile on a damaged page, pymmcore-plus once
    ``drivers.pymmcore_logging`` removed its own handlers) and Python warnings."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler._marrowcount = True  # type: ignore[attr-defined]
    top = logging.getLogger()
    # Replace a handler of an earlier call, keep anyone else's (a test runner's capture).
    top.handlers[:] = [h for h in top.handlers if not getattr(h, "_marrowcount", False)]
    top.addHandler(handler)
    top.setLevel(logging.WARNING)
    logging.captureWarnings(True)
    root = logging.getLogger("marrowcount")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    for name in ("drivers", "pipeline"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).setLevel(logging.WARNING)


def _safe(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)[:80]
