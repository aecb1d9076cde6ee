"""``marrowcount detect`` and ``eval-detect`` end to end, as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from pipeline.detect_eval import read_voc, score_image
from tests.conftest import BCCD, REPO

MARROWCOUNT = Path(sys.executable).with_name("marrowcount")


def run(*args: str) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    return subprocess.run(
        [str(MARROWCOUNT), *args], capture_output=True, text=True, cwd=REPO, timeout=600
    )


@pytest.fixture
def cli(capsys, monkeypatch):
    """Run ``marrowcount ARGS`` in this process through the real entry point ``main``;
    returns (exit code, stdout, stderr)."""
    from daemon.cli import main

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["marrowcount", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def jpeg(n: int) -> Path:
    return BCCD / "JPEGImages" / f"BloodImage_{n:05d}.jpg"


def test_folder_with_bad_files_reports_each_and_goes_on(tmp_path, cli):
    folder = tmp_path / "fields"
    folder.mkdir()
    shutil.copy(jpeg(374), folder / "a_good.jpg")
    (folder / "b_corrupt.jpg").write_bytes(jpeg(374).read_bytes()[:300])
    gray = cv2.imread(str(jpeg(168)), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(folder / "c_gray.png"), gray)
    cv2.imwrite(str(folder / "d_tiny.png"), cv2.imread(str(jpeg(168)))[:50, :50])
    shutil.copy(jpeg(168), folder / "e_good.jpg")
    overlays = tmp_path / "overlays"

    code, out, err = cli("detect", str(folder), "--um-per-px", "0.072", "--json", "--overlay", str(overlays))

    assert code != 0
    assert "Traceback" not in err
    records = [json.loads(line) for line in out.splitlines()]
    assert [Path(rec["image"]).name for rec in records] == ["a_good.jpg", "e_good.jpg"]
    assert [len(rec["cells"]) for rec in records] == [2, 1]
    for rec in records:
        for cell in rec["cells"]:
            assert set(cell) == {"x", "y", "box", "area_um2"} and len(cell["box"]) == 4
        assert rec["ms"] > 0
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 4  # one per bad file, then the summary
    assert "3 image(s) could not be analysed" in errors[-1]
    assert any("b_corrupt.jpg" in e and "not a readable image" in e for e in errors)
    assert any("c_gray.png" in e and "grayscale" in e for e in errors)
    assert any("d_tiny.png" in e and "smaller than one" in e for e in errors)
    assert sorted(p.name for p in overlays.iterdir()) == ["a_good.png", "e_good.png"]
    drawn = cv2.imread(str(overlays / "a_good.png"))
    assert drawn.shape == cv2.imread(str(jpeg(374))).shape


def test_bad_pixel_size_and_missing_file_fail_in_one_line(tmp_path, cli):
    for args, says in (
        (("detect", str(jpeg(374)), "--um-per-px", "-0.1"), "positive number"),
        (("detect", str(tmp_path / "nope.png"), "--um-per-px", "0.1"), "nope.png"),
        (("calibrate", str(tmp_path / "nope.png")), "nope.png"),
        # 13 for 0.13: refused before any image is enlarged 30-fold (it ran out of memory)
        (("detect", str(jpeg(374)), "--um-per-px", "13"), "coarser than any microscope image"),
        # a 10x objective's pixel size: too coarse to find a nucleus in
        (("detect", str(jpeg(374)), "--um-per-px", "1.3"), "too coarse to detect leukocytes"),
        (("analyze", str(jpeg(374)), "--um-per-px", "1.3"), "too coarse to detect leukocytes"),
    ):
        code, out, err = cli(*args)
        assert code == 2, args
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines and all(line.startswith("error:") for line in lines), err
        assert says in " ".join(err.split()), (args, err)
    # The installed console script: exit 2, one line, no traceback.
    r = run("detect", str(jpeg(374)), "--um-per-px", "0")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "µm per pixel" in r.stderr
    assert "Traceback" not in r.stderr


def test_eval_detect_on_a_handful_of_fields(tmp_path, cli):
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    fields = (10, 30, 168, 176, 374)
    for n in fields:
        name = f"BloodImage_{n:05d}"
        shutil.copy(BCCD / "Annotations" / f"{name}.xml", root / "Annotations")
        shutil.copy(jpeg(n), root / "JPEGImages")

    code, out, err = cli("eval-detect", "--root", str(root), "--json")
    assert code == 0, err
    result = json.loads(out)
    overall = result["overall"]
    images = result["images"]
    assert len(images) == len(fields)
    # The four categories add up, per image and overall.
    for rec in [*images, overall]:
        assert rec["correct"] + rec["missing"] + rec["multiple"] == rec["leukocytes"]
    boxes = sum(len(read_voc(root / "Annotations" / f"BloodImage_{n:05d}.xml").boxes) for n in fields)
    assert overall["leukocytes"] + overall["border"] == boxes
    assert overall["accuracy"] >= 0.75

    code, table, _ = cli("eval-detect", "--root", str(root), "--keep-border")
    assert code == 0
    for word in ("correct", "missing", "multiple", "false", "accuracy"):
        assert word in table


def test_score_categories():
    boxes = [(0, 0, 10, 10), (20, 0, 30, 10), (40, 0, 50, 10), (0, 90, 10, 100)]
    centres = [(5, 5), (22, 5), (28, 5), (70, 70), (5, 95)]
    s = score_image(boxes, centres, on_border=[False, False, False, True]).score
    assert (s.leukocytes, s.correct, s.missing, s.multiple, s.false, s.border) == (3, 1, 1, 1, 1, 1)
    assert s.detections == 4  # the centre in the border box is not scored
    assert np.isclose(s.accuracy, 1 / 3)
