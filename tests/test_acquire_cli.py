"""``marrowcount acquire`` on the virtual microscope: JSON result, clear errors."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

import daemon.cli  # noqa: F401  (registers every command)
from daemon.cli.app import app
from drivers.acquisition import AcquisitionError
from pipeline.errors import ImageError
from tests.acquire_fixtures import SMALL_CAMERA, bccd_slide, checkpoint_path


@pytest.fixture(scope="module")
def lab_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("lab") / "lab.yaml"
    path.write_text(yaml.safe_dump({"acquisition": {
        "virtual": SMALL_CAMERA, "quality": {"min_nucleated": 1}, "backoff_s": 0.001}}))
    return path


def test_acquire_json_reports_counts_fields_and_why_it_stopped(tmp_path, lab_config):
    cfg = yaml.safe_load(lab_config.read_text())
    cfg["classifier"] = {"checkpoint": str(checkpoint_path())}
    lab_config = tmp_path / "lab.yaml"
    lab_config.write_text(yaml.safe_dump(cfg))
    slide = bccd_slide(tmp_path, 4, 2, start=80)
    res = CliRunner().invoke(app, [
        "acquire", "--virtual-slide", str(slide), "--um-per-px", "0.072", "--target", "3",
        "--area", "0,0,184.32,69.12", "--config", str(lab_config), "--json",
    ])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["target"] == 3 and out["fields_planned"] == 8
    # These 8 BCCD fields hold a white cell nearly each: 3 are reached before the area ends,
    # and the count stops at the field that reaches them.
    assert out["stopped_because"] == "target_reached"
    cells = [f["cells"] for f in out["fields"]]
    assert sum(out["counts"].values()) == sum(cells) == out["counted"]
    assert sum(cells) >= 3 and sum(cells[:-1]) < 3 and len(cells) < 8
    for f in out["fields"]:
        assert set(f) == {"index", "x", "y", "z", "cells", "skipped_reason"}
        assert f["skipped_reason"] is None or f["cells"] == 0
    assert "non_leukocyte" not in out["counts"]


@pytest.mark.parametrize(
    "args, error, message",
    [
        (["--target", "0"], AcquisitionError, "positive"),
        (["--area", "1,2,3"], AcquisitionError, "x0,y0,x1,y1"),
        (["--area", "0,0,9000,9000"], AcquisitionError, "outside the stage limits"),
    ],
)
def test_acquire_refuses_bad_input_before_moving(tmp_path, lab_config, args, error, message):
    slide = bccd_slide(tmp_path, 2, 2)
    res = CliRunner().invoke(app, [
        "acquire", "--virtual-slide", str(slide), "--config", str(lab_config), *args])
    assert isinstance(res.exception, error) and message in str(res.exception)


def test_acquire_missing_slide_and_config(tmp_path):
    res = CliRunner().invoke(app, ["acquire", "--virtual-slide", str(tmp_path / "no.tif")])
    assert isinstance(res.exception, ImageError) and "no.tif" in str(res.exception)
    res = CliRunner().invoke(app, ["acquire", "--mm-config", str(tmp_path / "scope.cfg")])
    assert isinstance(res.exception, AcquisitionError)
    assert "no such Micro-Manager config" in str(res.exception)
