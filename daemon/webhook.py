"""Tell people what an unattended daemon did: slide events POSTed as JSON to a URL.

A chat or e-mail gateway (Teams, Slack, Mattermost, an SMTP relay with an HTTP front) turns
each event into a message, so a slide waiting for review, or a stage that failed overnight,
reaches a person without anyone watching the queue. Events go out from one background thread
in the order they happened; a slow or unreachable endpoint delays only the messages, never a
field, and is retried a few times before the message is dropped with a warning in the log.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.request
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("marrowcount.webhook")

_STOP = object()


def event_text(kind: str, name: str, counted: int, target: int, instrument: str,
               data: dict[str, Any]) -> str:
    """One line a person reads in a chat message or an e-mail subject."""
    if kind == "slide_finished":
        why = data.get("stopped_because")
        if why == "failed":
            return f"{name} failed on {instrument} at {counted} cells: {data.get('error', '')}"
        if why == "area_exhausted":
            return (f"{name}: counting area used up at {counted} of {target} cells on "
                    f"{instrument}; awaiting review (target not reached)")
        if why == "adaptive_stop":
            return (f"{name}: stopped early at {counted} of {target} cells on {instrument} "
                    "(every blast threshold decided); awaiting review")
        return f"{name}: {counted} of {target} cells counted on {instrument}; awaiting review"
    if kind == "pixel_size":
        return (f"{name}: pixel size stated {data['stated_um_per_px']:.3g} µm/px on "
                f"{instrument}, but its red cells measure {data['estimate_um_per_px']:.3g} "
                f"({data['off_pct']:+.0f}%); check the scanner's or objective's calibration")
    if kind == "slide_paused":
        return f"{name} paused at {counted} of {target} cells on {instrument}: {data.get('reason')}"
    return f"{name}: {kind.replace('_', ' ')} at {counted} of {target} cells on {instrument}"


def safe_url(url: str) -> str:
    """The URL without query, credentials or path, for logs (tokens often live there)."""
    u = urlsplit(url)
    return f"{u.scheme}://{u.hostname or ''}{f':{u.port}' if u.port else ''}/…"


class Webhook:
    """POST each message (a JSON-ready dict) to ``url``; ``retries`` more tries after the first,
    ``backoff_s`` apart, doubling."""

    def __init__(self, url: str, timeout_s: float = 5.0, retries: int = 3,
                 backoff_s: float = 2.0, on_drop: Callable[[int], None] | None = None) -> None:
        self.url = url
        self.on_drop = on_drop or (lambda n: None)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self.sent = 0
        self.dropped = 0
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1000)
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook", daemon=True)
        self._thread.start()

    def post(self, message: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(message)
        except queue.Full:  # the endpoint has been down for a long time: keep counting
            self._dropped(1)
            log.warning("webhook queue full; message dropped")

    def close(self, wait_s: float = 10.0) -> None:
        """Send what is queued, stop retrying after ``wait_s``, and stop the thread."""
        try:
            self._queue.put(_STOP, timeout=wait_s)
        except queue.Full:  # a long outage filled the queue: give up on its messages
            pass
        self._thread.join(wait_s)
        self._closing.set()
        self._thread.join(self.timeout_s + 1.0)
        left = 0
        while True:  # the thread takes no message once closing: what is left is ours
            try:
                left += self._queue.get_nowait() is not _STOP
            except queue.Empty:
                break
        if left:  # they vanished without a word when a hung endpoint held the shutdown
            self._dropped(left)
            log.warning("webhook %s: %d unsent message(s) discarded at shutdown",
                        safe_url(self.url), left)

    def _dropped(self, n: int) -> None:
        self.dropped += n
        self.on_drop(n)

    def _run(self) -> None:
        while not self._closing.is_set():
            message = self._queue.get()
            if message is _STOP:
                return
            try:
                self._send(message)
            except Exception:  # e.g. a message that is not JSON: drop it, keep the thread
                self._dropped(1)
                log.exception("webhook message dropped")

    def _send(self, message: dict[str, Any]) -> None:
        body = json.dumps(message).encode()
        delay = self.backoff_s
        for attempt in range(self.retries + 1):
            req = urllib.request.Request(self.url, data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    resp.read()
                self.sent += 1
                return
            except Exception as exc:  # any reply or transport failure: never end the thread
                why = getattr(exc, "reason", None) or f"{type(exc).__name__}: {exc}"
                if attempt == self.retries or self._closing.wait(delay):
                    self._dropped(1)
                    log.warning("webhook %s failed %d time(s) (%s); message dropped",
                                safe_url(self.url), attempt + 1, why)
                    return
                delay *= 2
