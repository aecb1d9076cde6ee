"""The method behind a count: every analysed field records the software, the model file's
SHA-256, the precision and a fingerprint of the settings, and a slide resumed after its model
file was replaced is reported as counted with two methods, in JSON, CSV, PDF and the review
page's data."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
from fastapi.testclient import TestClient
from pypdf import PdfReader

from daemon.report import build_report, report_csv, write_report
from daemon.review.app import create_app
from daemon.store import Store
from tests.conftest import REPO
from tests.daemon_fixtures import bccd_slide_file, daemon_config, run_in_process, submit
from tests.review_slide import TECH, add_users, login

SHIPPED = REPO / "pipeline" / "models" / "default.pt"


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def test_slide_resumed_under_a_replaced_model_reports_both_methods(tmp_path):
    slide = bccd_slide_file(tmp_path, cols=3, rows=1)
    model = tmp_path / "model.pt"
    shutil.copyfile(SHIPPED, model)
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'm.db'}",
                           extra={"classifier": {"checkpoint": str(model)}})
    cfg, (sid,) = submit(config, (slide, "BM-method"))
    first_sha = _sha(model)

    run_in_process(config, stop_after_first_field=True)  # SIGTERM's path: still acquiring
    # A lab copies a recalibrated model over the old file while the slide waits.
    ckpt = torch.load(model, map_location="cpu", weights_only=True)
    ckpt["temperature"] = float(ckpt["temperature"]) * 1.5
    torch.save(ckpt, model)
    second_sha = _sha(model)
    assert second_sha != first_sha
    run_in_process(config)

    with Store.from_params(cfg.store, cfg.resolve) as store:
        fields = store.fields(sid)
        assert [f.index for f in fields] == [0, 1, 2]
        assert store.slide(sid).status == "awaiting_review"
        shas = [f.method["model_sha256"] for f in fields]
        assert shas == [first_sha, second_sha, second_sha]
        assert {f.method["precision"] for f in fields} <= {"int8", "bf16"}
        assert {f.method["crop_um_per_px"] for f in fields} == {0.2}  # the checkpoint's scale
        assert len({f.method["settings"] for f in fields}) == 1  # the settings did not change
        rep = build_report(store, sid, cfg)
        methods = rep["methods"]
        assert [(m["model_sha256"], m["fields"]) for m in methods] == [(first_sha, 1),
                                                                       (second_sha, 2)]
        assert all(m["model"] == "model.pt" and m["taxonomy"] == cfg.taxonomy for m in methods)
        flag = next(f for f in rep["flags"] if f.startswith("counted with 2 methods"))
        assert first_sha in flag and second_sha in flag
        rows = [r for r in csv.DictReader(io.StringIO(report_csv(rep)))
                if r["quantity"] == "METHOD"]
        assert [int(r["n"]) for r in rows] == [1, 2] and second_sha in rows[1]["label"]
        pdf = tmp_path / "m.pdf"
        write_report(store, sid, cfg, "pdf", pdf)
        text = "".join(p.extract_text() for p in PdfReader(pdf).pages).replace("\n", " ")
        assert first_sha in text and second_sha in text

        add_users(store)
        client = TestClient(create_app(cfg, store))
        login(client, TECH)
        page = client.get(f"/slides/{sid}")
        assert page.status_code == 200
        shown = [line for line in page.text.splitlines() if 'class="meta method warn"' in line]
        assert len(shown) == 2 and first_sha in shown[0] and second_sha in shown[1]


def test_changed_settings_change_the_fingerprint_not_the_model(tmp_path, config):
    from daemon.provenance import analysis_method

    a = analysis_method(config, SHIPPED, "int8", 0.2)
    assert a["model_sha256"] == _sha(SHIPPED) and a["model"] == "default.pt"
    guided = config.model_copy(update={"analysis": config.analysis.model_copy(
        update={"guidance_threshold": config.analysis.guidance_threshold - 0.1})})
    b = analysis_method(guided, SHIPPED, "int8", 0.2)
    assert b["settings"] != a["settings"] and b["model_sha256"] == a["model_sha256"]
    # Where the checkpoint lives and how many crops go per batch change no call.
    moved = tmp_path / "elsewhere.pt"
    shutil.copyfile(SHIPPED, moved)
    batched = config.model_copy(update={"classifier": config.classifier.model_copy(
        update={"checkpoint": moved, "batch_size": 7})})
    c = analysis_method(batched, moved, "int8", 0.2)
    assert c["settings"] == a["settings"] and c["model_sha256"] == a["model_sha256"]


def test_a_damaged_model_file_pauses_slides_until_it_is_fixed(tmp_path):
    """A new checkpoint half copied over the old one: the next slide waits, unfailed, with the
    reason noted, and is counted once the file is whole again."""
    slide = bccd_slide_file(tmp_path, cols=3, rows=1)
    model = tmp_path / "model.pt"
    shutil.copyfile(SHIPPED, model)
    good = model.read_bytes()
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'p.db'}", retry_slide_after_s=0.2,
                           extra={"classifier": {"checkpoint": str(model)}})
    cfg, (first, second) = submit(config, (slide, "BM-A"), (slide, "BM-B"))
    paused: list[str] = []

    def on_event(e) -> None:
        if e.kind == "slide_finished" and e.name == "BM-A":
            model.write_bytes(good[: len(good) // 2])  # the copy broke off half way
        if e.kind == "slide_paused":
            paused.append(f"{e.name}: {e.data['reason']}")
            with Store.from_params(cfg.store, cfg.resolve) as store:
                note = store.slide(second).error
            assert note and "model not loaded" in note and "retrying" in note
            model.write_bytes(good)

    run_in_process(config, on_event)
    assert len(paused) == 1 and paused[0].startswith("BM-B: model not loaded")
    assert "not a readable checkpoint" in paused[0]
    with Store.from_params(cfg.store, cfg.resolve) as store:
        for sid in (first, second):
            sl = store.slide(sid)
            assert (sl.status, sl.error) == ("awaiting_review", None)
            assert [f.index for f in store.fields(sid)] == [0, 1, 2]
            assert {f.method["model_sha256"] for f in store.fields(sid)} == {_sha(SHIPPED)}


class _Inbox(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_slide_events_reach_a_webhook_and_a_dead_one_stops_nothing(tmp_path, caplog):
    slide = bccd_slide_file(tmp_path, cols=3, rows=1)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Inbox)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hooks/lab?token=s3cret"
        config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'w.db'}", webhook_url=url)
        cfg, (sid,) = submit(config, (slide, "BM-hook"))
        run_in_process(config)  # closing the service sends what is queued
        with Store.from_params(cfg.store, cfg.resolve) as store:
            counted = store.progress(sid).counted
    finally:
        server.shutdown()
    (msg,) = _Inbox.received  # slide_started is not in the default webhook_events
    assert (msg["event"], msg["slide"], msg["stopped_because"]) == (
        "slide_finished", "BM-hook", "area_exhausted")
    assert msg["counted"] == counted and msg["target"] == 1000
    assert msg["text"] == (f"BM-hook: counting area used up at {counted} of 1000 cells on "
                           "test-scope; awaiting review (target not reached)")

    # Nobody listening: the slide is counted all the same, the message dropped with a warning.
    dead = tmp_path / "dead"
    dead.mkdir()
    port = ThreadingHTTPServer(("127.0.0.1", 0), _Inbox)
    url = f"http://127.0.0.1:{port.server_port}/hook"
    port.server_close()
    config = daemon_config(dead, f"sqlite:///{dead / 'd.db'}", webhook_url=url)
    cfg, (sid,) = submit(config, (slide, "BM-dead"))
    with caplog.at_level(logging.WARNING, logger="marrowcount.webhook"):
        run_in_process(config)
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "marrowcount.webhook"]
    assert "message dropped" in warning and "/hook" not in warning.replace("/…", "")
    with Store.from_params(cfg.store, cfg.resolve) as store:
        assert store.slide(sid).status == "awaiting_review"
