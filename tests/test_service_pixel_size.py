"""The pixel-size check on incoming fields: the daemon measures the red cells of each slide's
first fields through the stated pixel size. A slide stated at the wrong pixel size (a scanner
set up for another objective) is logged, flagged in its report and on its review page; a
right one is not."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from daemon.report import build_report
from daemon.review.app import create_app
from daemon.store import RED_CELLS, Store
from drivers.slide_image import write_pyramid
from tests.conftest import BCCD_UM_PER_PX
from tests.daemon_fixtures import (bccd_slide_file, daemon_config, run_in_process, submit,
                                   webhook_inbox)
from tests.review_slide import TECH, add_users, login
from tests.slide_fixtures import bccd_mosaic


def test_a_slide_stated_at_the_wrong_pixel_size_is_flagged(tmp_path, caplog):
    # BCCD fields 250-252 hold 18 whole, isolated red cells (most BCCD fields hold 0-2).
    right = bccd_slide_file(tmp_path, cols=3, rows=1, start=250)
    wrong = tmp_path / "wrong.tif"  # the same real fields, stated at twice their pixel size
    write_pyramid(wrong, bccd_mosaic(3, 1, 250), 2 * BCCD_UM_PER_PX)
    server, received = webhook_inbox()
    try:
        config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'px.db'}",
                               webhook_url=f"http://127.0.0.1:{server.server_port}/hook")
        cfg, (ok, off) = submit(config, (right, "BM-right"), (wrong, "BM-wrong"))
        assert cfg.calibrate.check_fields > 3  # so the check also runs on a slide of 3 fields
        with caplog.at_level(logging.INFO, logger="marrowcount.service"):
            run_in_process(config)
    finally:
        server.shutdown()
    (alert,) = [m for m in received if m["event"] == "pixel_size"]
    assert alert["slide"] == "BM-wrong" and alert["text"].startswith(
        "BM-wrong: pixel size stated 0.144 µm/px on test-scope, but its red cells measure 0.0")
    warnings = [r.getMessage() for r in caplog.records if "pixel size of" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("pixel size of BM-wrong: stated 0.144")

    with Store.from_params(cfg.store, cfg.resolve) as store:
        assert all(RED_CELLS in f.quality for f in store.fields(ok))
        good = build_report(store, ok, cfg)
        bad = build_report(store, off, cfg)
        add_users(store)
        client = TestClient(create_app(cfg, store))
        login(client, TECH)
        assert 'id="pixel-size"' not in client.get(f"/slides/{ok}").text
        assert 'id="pixel-size"' in client.get(f"/slides/{off}").text
        queue = {r["name"]: r["flags"] for r in client.get("/api/queue").json()["slides"]}
    assert not any("pixel size" in f for f in queue["BM-right"])
    assert any(f.startswith("pixel size off +") for f in queue["BM-wrong"])
    g, b = good["slide"]["pixel_size_check"], bad["slide"]["pixel_size_check"]
    assert g["disagrees"] is False and g["fields"] == 3
    assert g["estimate_um_per_px"] == pytest.approx(BCCD_UM_PER_PX, rel=0.1)
    assert b["disagrees"] is True and b["stated_um_per_px"] == pytest.approx(2 * BCCD_UM_PER_PX)
    assert b["estimate_um_per_px"] == pytest.approx(BCCD_UM_PER_PX, rel=0.1)
    assert not any(f.startswith("pixel size check") for f in good["flags"])
    off_pct = 100 * (b["stated_um_per_px"] / b["estimate_um_per_px"] - 1)
    assert 70 < off_pct < 130
    assert any(f.startswith("pixel size check: red cells measure 0.0") and f"({off_pct:+.0f}%)"
               in f for f in bad["flags"])


def test_fields_the_quality_gate_skips_still_check_the_pixel_size(tmp_path):
    """With a wrong pixel size every field can look clumped or thin to the gate and be
    skipped: the slide then counted nothing and its report said nothing about the size. The
    skipped fields' red cells are measured all the same, and their images are not stored."""
    wrong = tmp_path / "wrong.tif"
    write_pyramid(wrong, bccd_mosaic(3, 1, 250), 2 * BCCD_UM_PER_PX)
    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'gate.db'}",
                           extra={"acquisition": {"quality": {"enabled": True}}})
    cfg, (sid,) = submit(config, (wrong, "BM-gated"))
    run_in_process(config)
    with Store.from_params(cfg.store, cfg.resolve) as store:
        fields = store.fields(sid)
        rep = build_report(store, sid, cfg)
    assert fields and all(f.skipped_reason for f in fields), [f.skipped_reason for f in fields]
    assert all(f.image_path is None and RED_CELLS in f.quality for f in fields)
    px = rep["slide"]["pixel_size_check"]
    assert px["disagrees"] is True
    assert px["estimate_um_per_px"] == pytest.approx(BCCD_UM_PER_PX, rel=0.1)
    assert any(f.startswith("pixel size check: red cells measure") for f in rep["flags"])
