"""systemd notifications (sd_notify): READY, STATUS with the current slide, WATCHDOG pings.

Outside systemd (no ``NOTIFY_SOCKET``) every call is a no-op. Watchdog pings are sent from
the daemon's own loop, between fields and while idle, never from a helper thread: a hung
acquisition must stop the pings so systemd restarts the service.
"""

from __future__ import annotations

import os
import threading
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self._sd = sdnotify.SystemdNotifier()
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        usec = os.environ.get("WATCHDOG_USEC", "")
        # Ping at a third of the interval systemd allows (and never more than once a second).
        self._every = max(int(usec) / 3e6, 1.0) if usec.isdigit() and int(usec) > 0 else None
        self._last_ping = 0.0

    def _send(self, msg: str) -> None:
        if self.enabled:
            self._sd.notify(msg)

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")

    def status(self, text: str) -> None:
        self._send(f"STATUS={text}")
        self.watchdog()

    @property
    def ping_every(self) -> float | None:
        """Seconds between watchdog pings (None outside a systemd watchdog): no wait of the
        daemon's loop may be longer, or systemd kills an idle daemon."""
        return self._every

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """``event.wait(seconds)``, pinging the watchdog at least every ``ping_every`` while
        it waits; True when the event was set."""
        end = time.monotonic() + seconds
        while True:
            self.watchdog()
            left = end - time.monotonic()
            if left <= 0:
                return event.is_set()
            if event.wait(left if self._every is None else min(left, self._every)):
                return True

    def watchdog(self) -> None:
        if self._every is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self._every:
            self._send("WATCHDOG=1")
            self._last_ping = now

    def reloading(self) -> None:
        self._send("RELOADING=1")

    def stopping(self) -> None:
        self._send("STOPPING=1\nSTATUS=stopping")
