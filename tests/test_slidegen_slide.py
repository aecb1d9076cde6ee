"""Virtual marrow slides: reproducible from a seed, real cells where the truth says, readable
as a pyramidal TIFF by OpenSlide and tifffile, and built only from held-out cells."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from drivers.slidegen import (
    build_slide,
    classifier_test_paths,
    heldout_rows,
    read_manifest,
    read_truth,
    segment_leukocyte,
    write_slide,
)
from pipeline.imaging import read_rgb
from tests.conftest import PBC


@pytest.fixture(scope="module")
def small(config):
    """One-field slide parameters: builds in a few seconds."""
    return config.slidegen.model_copy(update={
        "width_px": 1388, "height_px": 1040, "background_crops": 120,
        "leukocytes_per_field": (25.0, 40.0), "empty_fraction": 0.0})


@pytest.fixture(scope="module")
def slide(small):
    return build_slide(small, 11)


def test_same_seed_same_slide_other_seed_other_slide(small):
    tiny = small.model_copy(update={"width_px": 700, "height_px": 520, "background_crops": 80})
    first, again, other = build_slide(tiny, 11), build_slide(tiny, 11), build_slide(tiny, 12)
    assert first.truth["cells"]
    assert np.array_equal(again.rgb, first.rgb)
    assert again.truth == first.truth
    assert not np.array_equal(other.rgb, first.rgb)
    assert other.truth["cells"] != first.truth["cells"]


def test_truth_points_at_real_leukocytes(slide, small):
    """Stained leukocytes are blue-purple: at every true centre blue exceeds green far more
    than on the slide at large (plasma and red cells)."""
    rgb = slide.rgb.astype(np.int16)
    blue = rgb[..., 2] - rgb[..., 1]
    cells = slide.truth["cells"]
    assert len(cells) >= 15
    r = int(2.0 / small.um_per_px)
    at_cells = [blue[int(c["y"]) - r:int(c["y"]) + r, int(c["x"]) - r:int(c["x"]) + r].mean()
                for c in cells]
    assert np.median(at_cells) > np.median(blue) + 30
    assert {c["class"] for c in cells} <= set(small.class_mix)
    for c in cells:
        assert 0 <= c["x"] < small.width_px and 0 <= c["y"] < small.height_px
        assert 2.0 < c["r_um"] < 15.0  # leukocytes are 6-20 µm across
        assert (PBC / c["source"]).is_file()


def test_touching_clusters_platelets_and_debris_are_present(slide):
    clusters = [c["cluster"] for c in slide.truth["cells"] if c["cluster"] is not None]
    kinds = {o["kind"] for o in slide.truth["others"]}
    assert clusters and "platelet" in kinds


def test_pyramidal_tiff_readable_by_openslide_and_tifffile(tmp_path, slide, small):
    import openslide
    import tifffile

    params = small.model_copy(update={"compression": "deflate"})
    tif, js = tmp_path / "s.tif", tmp_path / "s.json"
    write_slide(slide, tif, js, params)
    with tifffile.TiffFile(tif) as t:
        assert len(t.pages) >= 2 and t.pages[0].is_tiled
        assert np.array_equal(t.pages[0].asarray(), slide.rgb)  # lossless here
        assert json.loads(t.pages[0].description)["um_per_px"] == pytest.approx(0.13)
    osr = openslide.OpenSlide(str(tif))
    try:
        assert osr.dimensions == (small.width_px, small.height_px)
        assert osr.level_count >= 2
        assert float(osr.properties["openslide.mpp-x"]) == pytest.approx(0.13, rel=1e-3)
        region = np.asarray(osr.read_region((300, 200), 0, (64, 48)).convert("RGB"))
        assert np.array_equal(region, slide.rgb[200:248, 300:364])
    finally:
        osr.close()
    assert read_truth(js) == json.loads(json.dumps(slide.truth))


def test_cells_come_only_from_the_classifier_test_split(config, small):
    """The default held-out set is the classifier's own test split: no training cell on a slide."""
    from daemon.config import REPO_ROOT
    from pipeline.datasets import label_index, read_source, split

    held = classifier_test_paths(config)
    samples = []
    for i, src in enumerate(config.train.sources):
        samples += read_source(src, REPO_ROOT, config.train.seed + i)
    index = label_index(config.classes.names)
    labels = np.array([index[s.label] for s in samples])
    sp = split(labels, config.train.seed, config.train.val_fraction)
    trained = {str(Path(samples[i].path).resolve()) for i in np.concatenate([sp["train"], sp["val"]])}
    pbc = str(PBC.resolve())
    held = {p for p in held if p.startswith(pbc)}  # a BCCD field holds train and test boxes
    assert held and not held & trained
    s = build_slide(small.model_copy(update={"width_px": 700, "height_px": 600}), 3, held)
    used = {str((PBC / c["source"]).resolve()) for c in s.truth["cells"]}
    assert used and used <= held


def test_hash_split_is_stratified_and_stable():
    rows = read_manifest(PBC)
    held = heldout_rows(rows, 6, 0)
    assert held == heldout_rows(list(reversed(rows)), 6, 0)  # independent of file order
    for label in ("basophil", "segmented_neutrophil"):
        n = sum(r["label"] == label for r in rows)
        assert abs(sum(r["label"] == label for r in held) - n / 6) <= 1


def test_segmentation_keeps_cytoplasm_of_real_neutrophils():
    """Cell masks of real segmented neutrophils hold the nucleus and, typically, a cytoplasm
    rim more than as large again; the background stays out."""
    rows = [r for r in read_manifest(PBC) if r["label"] == "segmented_neutrophil"][:8]
    ratios = []
    for r in rows:
        rgb = read_rgb(PBC / r["path"])
        cell, nucleus = segment_leukocyte(rgb)
        assert nucleus.sum() > 0 and not (nucleus & ~cell).any()
        assert cell.sum() < 0.5 * cell.size
        ratios.append(cell.sum() / nucleus.sum())
    assert np.median(ratios) > 2.0
