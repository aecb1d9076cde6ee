"""Slide events reach people through a webhook: a finished slide is POSTed as JSON with a
line of text; an endpoint that is down or answers garbage delays and stops nothing."""

from __future__ import annotations

import logging
import socketserver
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from daemon.store import Store
from daemon.webhook import Webhook
from tests.daemon_fixtures import (bccd_slide_file, daemon_config, run_in_process, submit,
                                   webhook_inbox)


def test_a_finished_slide_is_posted_with_a_line_of_text(tmp_path):
    slide = bccd_slide_file(tmp_path, cols=3, rows=1)
    server, received = webhook_inbox()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hooks/lab?token=s3cret"
        config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'w.db'}", webhook_url=url)
        cfg, (sid,) = submit(config, (slide, "BM-hook"))
        run_in_process(config)  # closing the service sends what is queued
        with Store.from_params(cfg.store, cfg.resolve) as store:
            counted = store.progress(sid).counted
    finally:
        server.shutdown()
    (msg,) = received  # slide_started is not in the default webhook_events
    assert (msg["event"], msg["slide"], msg["stopped_because"]) == (
        "slide_finished", "BM-hook", "area_exhausted")
    assert msg["counted"] == counted and msg["target"] == 1000
    assert msg["text"] == (f"BM-hook: counting area used up at {counted} of 1000 cells on "
                           "test-scope; awaiting review (target not reached)")


def test_nobody_listening_stops_nothing_and_the_token_stays_out_of_the_log(tmp_path, caplog):
    slide = bccd_slide_file(tmp_path, cols=3, rows=1)
    closed = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    url = f"http://127.0.0.1:{closed.server_port}/hook?token=s3cret"
    closed.server_close()
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'd.db'}", webhook_url=url)
    cfg, (sid,) = submit(config, (slide, "BM-dead"))
    with caplog.at_level(logging.WARNING, logger="marrowcount.webhook"):
        run_in_process(config)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "marrowcount.webhook"]
    assert "message dropped" in warning and "s3cret" not in warning
    with Store.from_params(cfg.store, cfg.resolve) as store:
        assert store.slide(sid).status == "awaiting_review"


def test_a_garbage_reply_drops_that_message_and_the_next_is_still_sent(caplog):
    class NotHttp(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.recv(65536)
            self.request.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")

    garbage = socketserver.ThreadingTCPServer(("127.0.0.1", 0), NotHttp)
    threading.Thread(target=garbage.serve_forever, daemon=True).start()
    try:
        hook = Webhook(f"http://127.0.0.1:{garbage.server_address[1]}/", retries=0)
        with caplog.at_level(logging.WARNING, logger="marrowcount.webhook"):
            hook.post({"event": "one"})
            hook.post({"event": "two"})
            hook.close()
    finally:
        garbage.shutdown()
        garbage.server_close()
    assert (hook.sent, hook.dropped) == (0, 2)  # the thread outlived the first bad reply
    assert sum("message dropped" in r.getMessage() for r in caplog.records) == 2


def test_an_endpoint_that_never_answers_loses_no_message_unsaid(caplog):
    """A hung endpoint holds the shutdown: what is still queued when it gives up is counted
    as dropped and said in the log (they had vanished without a word)."""
    import socket

    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(16)  # accepts connections, never answers
    drops: list[int] = []
    try:
        hook = Webhook(f"http://127.0.0.1:{hung.getsockname()[1]}/", timeout_s=0.5,
                       retries=0, on_drop=drops.append)
        with caplog.at_level(logging.WARNING, logger="marrowcount.webhook"):
            for i in range(6):
                hook.post({"event": i})
            hook.close(wait_s=0.3)
    finally:
        hung.close()
    assert hook.sent == 0 and hook.dropped == 6 and sum(drops) == 6
    assert any("unsent message(s) discarded at shutdown" in r.getMessage()
               for r in caplog.records)


def test_metrics_rates_fall_to_zero_when_idle():
    from daemon.metrics import Metrics

    now = [100.0]  # stepped by hand: a busy machine's pause must not decide the test
    m = Metrics(window_s=0.5, clock=lambda: now[0])

    def value(name: str) -> float:
        return m.registry.get_sample_value(name) or 0.0

    m.field_committed(7, 7)
    m.field_committed(5, 12)
    assert value("marrowcount_fields_per_second") == 4.0  # 2 fields in 0.5 s
    assert value("marrowcount_cells_per_second") == 24.0
    now[0] += 0.4
    assert value("marrowcount_fields_per_second") == 4.0  # still within the window
    now[0] += 0.2
    assert value("marrowcount_fields_per_second") == 0.0  # idle: no longer the last rate
    assert value("marrowcount_cells_per_second") == 0.0
    assert value("marrowcount_fields_total") == 2.0 and value("marrowcount_slide_counted") == 12
