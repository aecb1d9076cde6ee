"""The low-magnification pre-scan on the virtual microscope over a virtual marrow slide (real
PBC cells, thin areas): it leaves out the fields the counting pass's gate would skip, puts the
counting objective back, and refuses a config it cannot use before the stage moves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

import daemon.cli  # noqa: F401  (registers every command)
from daemon.cli.app import app
from drivers.acquisition import AcquisitionError
from drivers.micromanager import Microscope
from drivers.plan import plan_fields
from drivers.slide_image import open_slide
from drivers.slidegen import build_slide, write_slide
from pipeline.quality import assess_field
from tests.acquire_fixtures import acquisition_params, checkpoint_path, detect_params


@pytest.fixture(scope="module")
def marrow_slide(tmp_path_factory, config):
    """3 × 2 camera fields at 0.13 µm/px, half of it thin (seed 3: 3 fields countable)."""
    params = config.slidegen.model_copy(update={
        "width_px": 4164, "height_px": 2080, "empty_fraction": 0.5, "background_crops": 80})
    d = tmp_path_factory.mktemp("prescan")
    write_slide(build_slide(params, 3), d / "s.tif", d / "s.json", params)
    return d / "s.tif"


def _scope(path, **prescan) -> Microscope:
    params = acquisition_params(prescan={"enabled": True, **prescan})
    slide = open_slide(path)
    return Microscope.from_virtual_slide(slide, slide.um_per_px, params)


def test_prescan_leaves_out_the_fields_the_counting_gate_would_skip(marrow_slide):
    scope = _scope(marrow_slide)
    try:
        x0, y0, x1, y1 = scope.stage_limits_um
        full = plan_fields(((x0, y0), (x1, y1)), *scope.fov_um)
        plan = scope.plan(None, detect_params())
        # Pre-scanning is a few snaps at 10x, not a visit to every field.
        assert scope.xy_moves == plan.prescan["snaps"] < len(full)
        # Back on the counting objective, at its pixel size: a field in focus is the slide.
        assert scope.core.getCurrentConfig("Objective") == "100x"
        assert scope.core.getPixelSizeUm() == pytest.approx(0.13)
        x, y = full.positions[0]
        scope.move_xy(x, y)
        scope.move_z(scope.virtual.plane.z_at(x, y))
        w, h = scope.camera_size
        left, top = round(x / 0.13 - w / 2), round(y / 0.13 - h / 2)
        assert np.array_equal(scope.snap_rgb(), scope._slide.read_region(left, top, w, h))
        # What the counting pass's gate says of each field, in focus at 100x.
        skip = {}
        for x, y in full.positions:
            scope.move_xy(x, y)
            scope.move_z(scope.virtual.plane.z_at(x, y))
            rgb = scope.snap_rgb()
            skip[(x, y)] = assess_field(rgb, 0.13, scope.params.quality, detect_params()).reason
    finally:
        scope.close()
    kept = list(plan.positions)
    assert kept == [p for p in full.positions if p in set(kept)]  # plan order kept
    agree = sum((p in kept) == (skip[p] is None) for p in full.positions)
    assert agree >= len(full) - 1, skip
    assert 0 < len(kept) < len(full)
    s = plan.prescan
    assert (s["planned"], s["kept"], s["objective"]) == (len(full), len(kept), "10x")
    assert s["um_per_px"] == pytest.approx(1.3)
    assert {(r["x"], r["y"]) for r in s["left_out"]} == {
        (round(x, 2), round(y, 2)) for x, y in full.positions if (x, y) not in kept}
    assert all(r["reason"].startswith("pre-scan ") for r in s["left_out"])
    assert sum(s["left_out_by_reason"].values()) == len(full) - len(kept)


@pytest.mark.parametrize("prescan, message", [
    ({"config_group": "Turret"}, "config group 'Turret'"),
    ({"objective": "4x"}, "no preset '4x' (it has 100x, 10x)"),
    ({"objective": "100x"}, "does not see a whole counting field"),
])
def test_prescan_settings_it_cannot_use_are_refused(marrow_slide, prescan, message):
    scope = _scope(marrow_slide, **prescan)
    try:
        with pytest.raises(AcquisitionError, match=message.replace("(", r"\(").replace(")", r"\)")):
            scope.plan(None, detect_params())
        assert scope.xy_moves == 0
        assert scope.core.getCurrentConfig("Objective") == "100x"
    finally:
        scope.close()


def test_acquire_prescan_counts_only_the_kept_fields(marrow_slide, tmp_path):
    lab = tmp_path / "lab.yaml"
    lab.write_text(yaml.safe_dump({"classifier": {"checkpoint": str(checkpoint_path())}}))
    res = CliRunner().invoke(app, [
        "acquire", "--virtual-slide", str(marrow_slide), "--target", "10000", "--prescan",
        "--config", str(lab), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    pre = out["prescan"]
    assert out["fields_planned"] == pre["kept"] == len(out["fields"])
    assert pre["planned"] == pre["kept"] + len(pre["left_out"])
    assert out["stopped_because"] == "area_exhausted"
    left_out = {(r["x"], r["y"]) for r in pre["left_out"]}
    assert not left_out & {(f["x"], f["y"]) for f in out["fields"]}
    assert out["counted"] == sum(f["cells"] for f in out["fields"]) > 0


def test_the_daemon_stores_the_prescan_and_the_report_tells_it(marrow_slide, tmp_path):
    from daemon.config import load_config
    from daemon.report import build_report
    from daemon.service import Service, submit_slide
    from daemon.store import Store
    from tests.daemon_fixtures import daemon_config

    config = daemon_config(tmp_path, f"sqlite:///{tmp_path / 'p.db'}", target=10_000, extra={
        "acquisition": {"prescan": {"enabled": True}, "quality": {"enabled": True},
                        "virtual": {"camera_width": 1388, "camera_height": 1040}}})
    cfg = load_config(config)
    store = Store.from_params(cfg.store, cfg.resolve)
    svc = None
    try:
        submit_slide(store, cfg, marrow_slide, name="marrow")
        svc = Service(cfg, config, store=store)
        svc.run(exit_when_idle=True)
        slide = store.slide("marrow")
        pre = slide.plan["prescan"]
        assert slide.stopped_because == "area_exhausted"
        assert 0 < pre["kept"] < pre["planned"] == pre["kept"] + len(pre["left_out"])
        assert len(slide.plan["positions"]) == pre["kept"]
        report = build_report(store, "marrow", cfg)
        assert report["slide"]["fields"] == pre["kept"]
        assert report["slide"]["prescan"] == {k: pre[k] for k in (
            "objective", "um_per_px", "planned", "kept", "left_out_by_reason")}
    finally:
        if svc is not None:
            svc.close()
        store.close()


def test_kept_fields_are_visited_by_area_best_first():
    """A 6 × 2 grid in 3 × 3-field areas: the right-hand area keeps all its fields, the left
    one loses two, so the right one is visited first, each area in plan (serpentine) order;
    with one-field areas the most cellular field comes first."""
    from drivers.prescan import ranked

    plan = plan_fields(((0, 0), (6 * 180.0, 2 * 135.0)), 180.0, 135.0)
    assert len(plan) == 12
    left = [i for i, (x, _) in enumerate(plan.positions) if x < 3 * 180]
    kept = [i for i in range(12) if i not in left[:2]]
    nucleated = {i: 20 + i for i in range(12)}
    order = ranked(plan, kept, nucleated, 3)
    right = [i for i in kept if i not in left]
    assert order == sorted(right) + sorted(set(left[2:]))
    assert ranked(plan, kept, nucleated, 1) == sorted(kept, key=lambda i: -nucleated[i])
