"""Prometheus metrics of the daemon: fields/s, cells/s, queue length, errors.

Counters (``marrowcount_fields_total``, ``marrowcount_cells_total``) give rates with
PromQL ``rate()``; the daemon also exports its own recent rates as gauges for a quick look
without a Prometheus server (``curl host:port/metrics``). Each ``Metrics`` has its own
registry, so several daemons in one test process never collide.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class Metrics:
    """The daemon's metrics; ``serve(port, host)`` exposes them over HTTP (port 0: off)."""

    def __init__(self, window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.fields = Counter("marrowcount_fields", "Fields committed", registry=r)
        self.cells = Counter("marrowcount_cells", "Counted leukocytes committed", registry=r)
        self.errors = Counter("marrowcount_errors", "Errors by kind", ["kind"], registry=r)
        self.slides = Counter("marrowcount_slides_finished", "Slides finished by outcome",
                              ["outcome"], registry=r)
        self.queue_length = Gauge("marrowcount_queue_length",
                                  "Slides waiting to be counted (queued, or started and not "
                                  "finished: paused or being counted)", registry=r)
        self.fields_per_s = Gauge("marrowcount_fields_per_second",
                                  f"Fields committed per second over the last {window_s:g} s",
                                  registry=r)
        self.cells_per_s = Gauge("marrowcount_cells_per_second",
                                 f"Counted cells per second over the last {window_s:g} s",
                                 registry=r)
        self.slide_counted = Gauge("marrowcount_slide_counted",
                                   "Counted leukocytes of the slide being counted", registry=r)
        self._window = window_s
        self._clock = clock  # a test steps its own
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()  # the HTTP thread reads the rates as the daemon adds
        # Worked out at each scrape, so an idle daemon's rates fall to 0 (they had kept the
        # last field's value for ever).
        self.fields_per_s.set_function(lambda: self._rates()[0])
        self.cells_per_s.set_function(lambda: self._rates()[1])
        self._server = None

    def serve(self, port: int, host: str) -> None:
        if port:
            self._server, _thread = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def field_committed(self, n_counted: int, slide_counted: int) -> None:
        """A field newly committed (not one found already stored)."""
        self.fields.inc()
        self.cells.inc(n_counted)
        self.slide_counted.set(slide_counted)
        now = self._clock()
        with self._lock:
            self._recent.append((now, n_counted))
            self._prune(now)  # unscraped, the window must not grow with every field

    def _rates(self) -> tuple[float, float]:
        """(fields/s, cells/s) over the last ``window_s`` seconds."""
        with self._lock:
            self._prune(self._clock())
            n_fields, n_cells = len(self._recent), sum(n for _, n in self._recent)
        return n_fields / self._window, n_cells / self._window

    def _prune(self, now: float) -> None:
        while self._recent and now - self._recent[0][0] > self._window:
            self._recent.popleft()

    def error(self, kind: str) -> None:
        self.errors.labels(kind=kind).inc()
