"""``marrowcount make-slide``, ``analyze`` and ``eval-analyze`` end to end on real cells."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from daemon.cli import app
from drivers.slide_image import open_slide
from drivers.slidegen import read_truth
from pipeline.errors import ImageError

runner = CliRunner()


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory):
    """A two-field slide written by the CLI (fallback hash split: no training config read)."""
    d = tmp_path_factory.mktemp("slide")
    res = runner.invoke(app, ["make-slide", str(d / "s.tif"), "--seed", "5", "--width-px", "2776",
                              "--height-px", "1040", "--split", "hash"])
    assert res.exit_code == 0, res.output
    return d / "s.tif", d / "s.json"


def test_make_slide_writes_a_readable_slide_and_truth(small_slide):
    tif, js = small_slide
    truth = read_truth(js)
    with open_slide(tif) as s:
        assert (s.width, s.height) == (2776, 1040)
        assert s.um_per_px == pytest.approx(0.13)
    assert truth["width"] == 2776 and len(truth["cells"]) > 10
    assert all({"x", "y", "class", "source"} <= set(c) for c in truth["cells"])


def test_analyze_json_and_overlay(small_slide, tmp_path):
    tif, _ = small_slide
    with open_slide(tif) as s:
        field = s.read_region(0, 0, 1388, 1040)
    png = tmp_path / "field.png"
    cv2.imwrite(str(png), field[:, :, ::-1])
    res = runner.invoke(app, ["analyze", str(png), "--um-per-px", "0.13", "--json",
                              "--overlay", str(tmp_path / "ov")])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout.strip().splitlines()[0])
    assert rec["image"] == str(png) and rec["ms"] > 0
    assert len(rec["cells"]) > 5
    for c in rec["cells"]:
        assert {"x", "y", "box", "label", "confidence", "probabilities", "guided",
                "duplicate_of", "needs_review"} <= set(c)
        assert abs(sum(c["probabilities"].values()) - 1) < 1e-2
        assert 0 <= c["x"] < 1388 and 0 <= c["y"] < 1040
    ov = cv2.imread(str(tmp_path / "ov" / "field.png"))
    assert ov.shape == field.shape and not np.array_equal(ov, field[:, :, ::-1])


def test_analyze_reports_unreadable_files_and_goes_on(tmp_path, small_slide):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not an image")
    res = runner.invoke(app, ["analyze", str(bad), "--um-per-px", "0.13", "--json"])
    assert isinstance(res.exception, ImageError)
    assert "broken.png" in res.output


def test_eval_analyze_scores_add_up(small_slide):
    tif, js = small_slide
    res = runner.invoke(app, ["eval-analyze", str(tif), str(js), "--fields", "2", "--json",
                              "--no-guidance"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    (name, s), = out["results"].items()
    assert name.startswith("guidance off")
    t = s["true_cells"]
    d, c = s["detection"], s["counting"]
    assert t > 10 and s["fields"] == 2 and s["guided"] == 0
    assert d["correct"] + d["missing"] + d["multiple"] == t
    assert c["counted_once"] + c["counted_twice"] + c["not_counted"] == t
    assert s["overall_accuracy_pct"] <= 100 * c["counted_once"] / t + 1e-6
    shares = s["differential"]
    assert abs(sum(v["true_pct"] for v in shares.values()) - 100) < 0.5
    per = s["per_true_class"]
    assert sum(v["true"] for v in per.values()) == t
    assert sum(v["not_counted"] for v in per.values()) == c["not_counted"]
    right = sum(v["counted_once_as"].get(k, 0) for k, v in per.items())
    assert abs(100 * right / t - s["overall_accuracy_pct"]) < 0.01


def test_eval_analyze_prints_where_each_true_class_went(small_slide):
    tif, js = small_slide
    # 80 columns, as when piped or logged: every class name is shown whole.
    res = runner.invoke(app, ["eval-analyze", str(tif), str(js), "--fields", "2",
                              "--no-guidance"], env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    assert "right" in res.output and "missed" in res.output and "counted as" in res.output
    rows = {line.split()[0] for line in res.output.splitlines() if line.strip()}
    truth = json.loads(js.read_text())
    classes = {x["class"] for x in truth["cells"]}
    assert classes <= rows, (classes - rows, res.output)
    assert max(len(line) for line in res.output.splitlines()) <= 80


def test_a_cell_whose_lobes_cross_the_field_edge_is_cut_not_missed(small_slide):
    """A truth cell counts as inside a field only when its whole composited extent (its box:
    lobes included) is; the equal-area disc of a lobed neutrophil is smaller than the cell."""
    from pipeline.score_analysis import FieldWindow, _edge_cells, true_cells_in

    truth = read_truth(small_slide[1])
    um = truth["um_per_px"]
    # The real cell reaching furthest left of its disc.
    cell = max(truth["cells"], key=lambda c: c["x"] - c["r_um"] / um - c["box"][0])
    reach = cell["x"] - cell["r_um"] / um - cell["box"][0]
    assert reach > 2, reach
    # A field whose left edge passes between the cell's box and its disc.
    left = int(cell["box"][0] + reach / 2)
    win = FieldWindow(left, max(0, cell["box"][1] - 50), 1388, 1040)
    inside, cut = true_cells_in(truth, win)
    assert cell["id"] not in {c["id"] for c in inside}
    assert cut >= 1
    x0, y0, x1, y1 = (v - o for v, o in zip(cell["box"], (win.x, win.y, win.x, win.y)))
    assert (x0, y0, x1, y1) in _edge_cells(truth, win)
    # A field that holds its whole box holds the cell.
    whole = FieldWindow(cell["box"][0] - 1, max(0, cell["box"][1] - 50), 1388, 1040)
    assert cell["id"] in {c["id"] for c in true_cells_in(truth, whole)[0]}


def test_score_field_tallies_each_category_by_hand():
    """A hand-made truth of four cells and five detections, scored as the seed scores:
    one found once and right, one found once and wrong, one found twice and counted twice,
    one missed; a detection on no cell is false; one outside a cell's radius matches nothing."""
    from pipeline.analyze import CellResult
    from pipeline.score_analysis import AnalysisScore, FieldWindow, score_field

    truth = {"um_per_px": 0.1, "cells": [
        {"x": 200, "y": 200, "r_um": 4.0, "class": "lymphocyte"},
        {"x": 500, "y": 200, "r_um": 4.0, "class": "monocyte"},
        {"x": 200, "y": 500, "r_um": 5.0, "class": "band_neutrophil"},
        {"x": 500, "y": 500, "r_um": 4.0, "class": "eosinophil"},
    ]}
    crop = np.zeros((96, 96, 3), np.uint8)

    def det(i, x, y, label, dup=None):
        return CellResult(i, float(x), float(y), (x - 30, y - 30, x + 30, y + 30), 30.0, crop,
                          {label: 0.9}, label, label, 0.9, False, dup, None, False)

    cells = [det(0, 205, 195, "lymphocyte"),        # right, 7 px from the centre (r 40 px)
             det(1, 500, 230, "eosinophil"),        # wrong class, inside the monocyte
             det(2, 180, 500, "band_neutrophil"),   # one band detected twice, both counted
             det(3, 225, 500, "band_neutrophil"),
             det(4, 545, 500, "eosinophil"),        # 45 px off, outside the 40 px radius
             det(5, 800, 800, "lymphocyte")]        # on no cell at all
    acc = AnalysisScore()
    score_field(truth, FieldWindow(0, 0, 1000, 1000), cells, 1.0, acc)
    assert (acc.true_cells, acc.detections) == (4, 6)
    assert (acc.correct, acc.multiple, acc.missing, acc.false) == (2, 1, 1, 2)
    assert (acc.counted_once, acc.counted_twice, acc.not_counted) == (2, 1, 1)
    assert (acc.classified, acc.classified_right, acc.overall_right) == (3, 2, 1)
    assert acc.confusion == {("lymphocyte", "lymphocyte"): 1, ("monocyte", "eosinophil"): 1}
    # Suppress the second band detection: the cell is counted once, and right.
    cells[3] = det(3, 225, 500, "band_neutrophil", dup=2)
    acc = AnalysisScore()
    score_field(truth, FieldWindow(0, 0, 1000, 1000), cells, 1.0, acc)
    assert (acc.counted_once, acc.counted_twice, acc.overall_right) == (3, 0, 2)
    assert (acc.duplicates_suppressed, acc.duplicates_wrongly_suppressed) == (1, 0)
