"""Virtual marrow slides: reproducible from a seed, real cells where the truth says, readable
as a pyramidal TIFF by OpenSlide and tifffile, and built only from held-out cells."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from drivers.slidegen import (
    build_slide,
    classifier_split_paths,
    heldout_rows,
    nuclei_in_cell,
    read_manifest,
    read_truth,
    second_nucleus_um,
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

    held = classifier_split_paths(config, "test")
    samples = []
    for i, src in enumerate(config.train.sources):
        samples += read_source(src, REPO_ROOT, config.train.seed + i)
    index = label_index(config.classes.model_names)
    labels = np.array([index[s.label] for s in samples])
    sp = split(labels, config.train.seed, config.train.val_fraction)
    trained = {str(Path(samples[i].path).resolve()) for i in np.concatenate([sp["train"], sp["val"]])}
    pbc = str(PBC.resolve())
    held = {p for p in held if p.startswith(pbc)}  # a BCCD field holds train and test boxes
    assert held and not held & trained
    s = build_slide(small.model_copy(update={"width_px": 700, "height_px": 600}), 3, held)
    used = {str((PBC / c["source"]).resolve()) for c in s.truth["cells"]}
    assert used and used <= held
    # `make-slide --split val` (choosing analysis settings): validation cells only.
    val = {p for p in classifier_split_paths(config, "val") if p.startswith(pbc)}
    want = {str(Path(samples[i].path).resolve()) for i in sp["val"]}
    assert val and val == {p for p in want if p.startswith(pbc)} and not val & held


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


def test_crops_showing_a_second_cell_are_recognised():
    """Some PBC crops of one-nucleus classes cut out a neighbour too (a lymphocyte beside
    another white cell): the truth would call that one cell, so slidegen leaves such crops
    out (slidegen.second_cell_um); single cells pass. The neighbour's nucleus may lie far from
    the crop centre (the last three: an erythroblast pair, a lymphocyte on a monocyte, a cell
    beside a myelocyte), where the central-nucleus segmentation does not reach it."""
    two = ["images/lymphocyte/LY_914453.jpg", "images/monocyte/MO_900927.jpg",
           "images/promyelocyte/PMY_426871.jpg", "images/erythroblast/ERB_20087.jpg",
           "images/monocyte/MO_294724.jpg", "images/myelocyte/MY_89581.jpg"]

    def second(rel: str) -> float:
        rgb = read_rgb(PBC / rel)
        cell, _ = segment_leukocyte(rgb)
        return second_nucleus_um(nuclei_in_cell(rgb, cell), 0.1)

    for rel in two:
        assert second(rel) >= 9.0, rel
    rows = read_manifest(PBC)
    singles = [r["path"] for r in rows if r["label"] == "lymphocyte"][:20]
    singles += [r["path"] for r in rows if r["label"] == "myelocyte"][:20]
    dist = [second(p) for p in singles]
    assert sum(d >= 7.0 for d in dist) <= 1, dist


def test_a_slide_of_training_cells_trains_as_points_and_never_reaches_the_test_split(
        config, small, tmp_path):
    """make-slide --split train draws only the classifier's training cells; read back as a
    train_only `points` source its cells sit at their true centres, and adding it leaves the
    split of every other source exactly as it was."""
    from daemon.config import REPO_ROOT
    from pipeline.datasets import (DatasetError, SourceParams, label_index, load_crops,
                                   read_source, split)

    pbc = str(PBC.resolve())
    train = {p for p in classifier_split_paths(config, "train") if p.startswith(pbc)}
    tested = classifier_split_paths(config, "test") | classifier_split_paths(config, "val")
    params = small.model_copy(update={"width_px": 700, "height_px": 600})
    s = build_slide(params, 5, train)
    used = {str((PBC / c["source"]).resolve()) for c in s.truth["cells"]}
    assert used and used <= train and not used & tested
    write_slide(s, tmp_path / "t.tif", tmp_path / "t.json", params)

    src = SourceParams(kind="points", path=tmp_path / "t.json", um_per_px=params.um_per_px,
                       exclude=("platelet", "debris"), rename={}, max_per_label=0,
                       background_per_image=0, train_only=True)
    pts = read_source(src, REPO_ROOT, 0)
    assert [(p.label, p.center) for p in pts] == [(c["class"], (c["x"], c["y"]))
                                                 for c in s.truth["cells"]]
    assert all(p.train_only for p in pts)
    crops = load_crops(pts, config.classes.model_names, 0.2, size=96)
    assert len(crops.crops) == len(pts) and not crops.problems
    # A stained nucleus (blue over green) sits at the centre of each crop, not at its rim.
    c = crops.crops.astype(np.int16)
    blue = c[..., 2] - c[..., 1]
    assert np.median(blue[:, 38:58, 38:58].mean((1, 2)) - blue[:, :8].mean((1, 2))) > 20

    base = []
    for i, source in enumerate(config.train.sources):
        base += read_source(source, REPO_ROOT, config.train.seed + i)
    index = label_index(config.classes.model_names)
    labels = np.array([index[x.label] for x in base + pts])
    mask = np.arange(len(labels)) >= len(base)
    old = split(labels[~mask], config.train.seed, config.train.val_fraction)
    new = split(labels, config.train.seed, config.train.val_fraction, mask)
    for part in ("val", "test"):
        assert np.array_equal(new[part], old[part]), part
    assert np.array_equal(new["train"], np.concatenate([old["train"], np.flatnonzero(mask)]))

    with pytest.raises(DatasetError, match="0.1 µm/px|µm/px"):
        read_source(src.model_copy(update={"um_per_px": 0.1}), REPO_ROOT, 0)


def test_the_split_for_training_slides_needs_no_training_slide_yet(config, tmp_path):
    """config/field_cells.yaml names the slides that make-slide --split train is about to
    build: their train_only sources never shape the split, so they need not exist yet."""
    from daemon.config import REPO_ROOT, load_config

    cells = load_config(REPO_ROOT / "config" / "field_cells.yaml")
    missing = cells.train.sources[-1].model_copy(update={"path": tmp_path / "none.json"})
    cells = cells.model_copy(update={"train": cells.train.model_copy(
        update={"sources": (*cells.train.sources, missing)})})
    assert any(s.train_only for s in cells.train.sources)
    for part in ("train", "val", "test"):
        assert classifier_split_paths(cells, part) == classifier_split_paths(config, part), part
