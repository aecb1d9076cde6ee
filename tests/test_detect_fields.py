"""Leukocyte detection on real BCCD peripheral-blood fields (0.072 µm/px).

The fields were picked by looking at them (overlays): 168 holds one segmented neutrophil whose
two nucleus lobes are separate blobs; 176 two leukocytes whose cells touch; 164 a neutrophil
whose nucleus is cut by the lower field edge; 374 two neutrophils and many red cells.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from pipeline.detect import Detection, detect, nucleus_map
from pipeline.detect_eval import read_voc
from pipeline.errors import ImageError
from pipeline.imaging import CROP_SIZE, crop_at, read_rgb, resample
from tests.conftest import BCCD, BCCD_UM_PER_PX

CROP_UM_PER_PX = 0.2


def field(n: int) -> tuple[np.ndarray, tuple]:
    name = f"BloodImage_{n:05d}"
    return read_rgb(BCCD / "JPEGImages" / f"{name}.jpg"), read_voc(BCCD / "Annotations" / f"{name}.xml").boxes


def inside(d: Detection, box) -> bool:
    return box[0] <= d.x <= box[2] and box[1] <= d.y <= box[3]


def test_lobed_neutrophil_counted_once(config):
    rgb, boxes = field(168)
    (box,) = boxes
    # The nucleus map shows the two lobes as separate blobs of several µm² each ...
    p = config.detect
    work = resample(rgb, BCCD_UM_PER_PX, p.work_um_per_px)
    f = rgb.shape[1] / work.shape[1]
    n, _, stats, centroids = cv2.connectedComponentsWithStats(
        (nucleus_map(work, p) > p.min_saturation).astype(np.uint8)
    )
    lobes = [
        i for i in range(1, n)
        if stats[i, 4] * p.work_um_per_px**2 > 10
        and box[0] <= centroids[i, 0] * f <= box[2] and box[1] <= centroids[i, 1] * f <= box[3]
    ]
    assert len(lobes) >= 2
    # ... and the detector still reports one cell, and nothing else in the field.
    cells = detect(rgb, BCCD_UM_PER_PX, p, CROP_UM_PER_PX)
    assert len(cells) == 1 and inside(cells[0], box)


def test_two_touching_cells_counted_as_two(config):
    rgb, boxes = field(176)
    assert len(boxes) == 2
    a, b = boxes
    assert a[2] > b[0]  # the two cells' boxes overlap: the cells touch
    cells = detect(rgb, BCCD_UM_PER_PX, config.detect, CROP_UM_PER_PX)
    assert len(cells) == 2
    assert sum(inside(c, a) and not inside(c, b) for c in cells) == 1
    assert sum(inside(c, b) and not inside(c, a) for c in cells) == 1


def test_border_cell_excluded(config):
    rgb, boxes = field(164)
    (box,) = boxes
    assert box[3] >= rgb.shape[0] - 1  # the cell runs off the lower edge
    assert detect(rgb, BCCD_UM_PER_PX, config.detect, CROP_UM_PER_PX) == []
    keep = config.detect.model_copy(update={"exclude_border": False})
    cells = detect(rgb, BCCD_UM_PER_PX, keep, CROP_UM_PER_PX)
    assert len(cells) == 1 and inside(cells[0], box)


def test_same_cells_at_two_pixel_sizes(config):
    rgb, boxes = field(374)
    base = detect(rgb, BCCD_UM_PER_PX, config.detect, CROP_UM_PER_PX)
    assert len(base) == 2
    for scale in (0.1, 0.13):
        other = resample(rgb, BCCD_UM_PER_PX, scale)
        cells = detect(other, scale, config.detect, CROP_UM_PER_PX)
        assert len(cells) == len(base)
        for c, d in zip(cells, base):
            # Same centre within 1 µm and same nucleus area within 15%.
            dist_um = np.hypot(c.x * scale - d.x * BCCD_UM_PER_PX, c.y * scale - d.y * BCCD_UM_PER_PX)
            assert dist_um < 1.0
            assert abs(c.area_um2 - d.area_um2) < 0.15 * d.area_um2


def test_detection_plain_data(config):
    rgb, boxes = field(374)
    cells = detect(rgb, BCCD_UM_PER_PX, config.detect, CROP_UM_PER_PX)
    h, w = rgb.shape[:2]
    field_sat = np.median(cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[..., 1])
    for c in cells:
        x0, y0, x1, y1 = c.box
        assert 0 <= x0 < c.x < x1 <= w and 0 <= y0 < c.y < y1 <= h
        assert all(isinstance(v, int) for v in c.box)
        assert c.crop.shape == (CROP_SIZE, CROP_SIZE, 3) and c.crop.dtype == np.uint8
        # A leukocyte nucleus: between a small lymphocyte's and a large monocyte's.
        assert 15 < c.area_um2 < 150
        # The crop is the imaging crop at the cell centre, and a nucleus fills much of it.
        assert np.array_equal(c.crop, crop_at(rgb, BCCD_UM_PER_PX, (c.x, c.y), CROP_UM_PER_PX))
        sat = cv2.cvtColor(c.crop[32:64, 32:64], cv2.COLOR_RGB2HSV)[..., 1].mean()
        assert sat > field_sat + 30
    with pytest.raises(Exception):
        cells[0].x = 0.0  # frozen


def test_red_cells_and_platelets_are_not_leukocytes(config):
    # Field 30: a neutrophil at the left edge, platelets and many red cells elsewhere.
    rgb, boxes = field(30)
    keep = config.detect.model_copy(update={"exclude_border": False})
    cells = detect(rgb, BCCD_UM_PER_PX, keep, CROP_UM_PER_PX)
    assert len(cells) == 1 and inside(cells[0], boxes[0])
    platelets = read_voc(BCCD / "Annotations" / "BloodImage_00030.xml", ("Platelets",)).boxes
    assert len(platelets) >= 3


def test_bad_images_raise_clear_errors(config):
    rgb, _ = field(374)
    with pytest.raises(ImageError, match="grayscale"):
        detect(rgb[:, :, 0], BCCD_UM_PER_PX, config.detect, CROP_UM_PER_PX)
    with pytest.raises(ImageError, match="smaller than one"):
        detect(rgb[:60, :60], BCCD_UM_PER_PX, config.detect, CROP_UM_PER_PX)
    with pytest.raises(ImageError, match="positive"):
        detect(rgb, 0.0, config.detect, CROP_UM_PER_PX)


def test_other_source_every_leukocyte_class_once_and_few_platelets(config):
    """PBC (CellaVision, another stain and camera, 0.10 µm/px): each image holds one labelled
    cell near its centre. Every leukocyte class, erythroblasts included, is found exactly
    once there; most platelet images give nothing. These are single-cell crops, not fields:
    large cells reach the crop edge, so the border rule is off."""
    import csv
    from collections import defaultdict

    from tests.conftest import PBC, PBC_UM_PER_PX

    keep = config.detect.model_copy(update={"exclude_border": False})
    by_label = defaultdict(list)
    with open(PBC / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            by_label[row["label"]].append(row["path"])
    for label, paths in sorted(by_label.items()):
        paths = sorted(paths)
        sample = paths[:: len(paths) // 4][:4] if label != "platelet" else paths[::100][:20]
        found = []
        for rel in sample:
            rgb = read_rgb(PBC / rel)
            cells = detect(rgb, PBC_UM_PER_PX, keep, CROP_UM_PER_PX)
            h, w = rgb.shape[:2]
            central = [c for c in cells if np.hypot(c.x - w / 2, c.y - h / 2) < w / 3]
            found.append(len(central))
        if label == "platelet":
            assert sum(n > 0 for n in found) <= 0.4 * len(found), found
        else:
            assert found == [1] * len(sample), (label, found)


def _segmented_cells(label: str, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The first ``n`` real PBC cells of ``label`` (every 7th manifest row) whose segmented
    mask clears the image edge: (RGB, cell mask) pairs."""
    from drivers.slidegen import read_manifest, segment_leukocyte
    from tests.conftest import PBC

    cells = []
    for r in [r for r in read_manifest(PBC) if r["label"] == label][::7]:
        rgb = read_rgb(PBC / r["path"])
        seg = segment_leukocyte(rgb)
        if seg is None or seg[0][[0, -1]].any() or seg[0][:, [0, -1]].any():
            continue
        cells.append((rgb, seg[0]))
        if len(cells) == n:
            break
    return cells


def _overlapping_pair(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray],
                      overlap_px: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two real segmented cells on A's plasma, B laid over A's right side by ``overlap_px``
    (as cells lie in a dense marrow smear). Returns (field, A's visible mask, B's mask)."""
    (ra, ma), (rb, mb) = a, b
    plasma = np.median(ra[~cv2.dilate(ma.astype(np.uint8), np.ones((15, 15))).astype(bool)
                          & (ra[..., 1] > 200)], axis=0)
    h, w = 600, 900
    out = np.empty((h, w, 3), np.uint8)
    out[:] = plasma.astype(np.uint8)
    ya, xa = np.nonzero(ma)
    yb, xb = np.nonzero(mb)
    la = np.zeros((h, w), bool)
    la[ya - int(ya.mean()) + 300, xa - int(xa.mean()) + 300] = True
    out[la] = ra[ma]
    # B starts where its mask just clears A's, then moves left by the overlap.
    reach = int(xa.max() - xa.mean()) + int(xb.mean() - xb.min()) + 2
    lb = np.zeros((h, w), bool)
    lb[yb - int(yb.mean()) + 300, xb - int(xb.mean()) + 300 + reach - overlap_px] = True
    out[lb] = rb[mb]
    return out, la & ~lb, lb


def test_overlapping_round_cells_are_two_detections(config):
    """Real lymphocytes (PBC) overlapping by 1.5 µm, the way marrow cells lie: closing the
    gap between lobes of one nucleus must not make the two nuclei one cell. Measured: 14 of
    20 pairs give exactly one detection per cell (9 of 20 with the earlier split settings:
    any nucleus area under 130 µm² was one cell, cut only at necks under 0.75 of a
    diameter)."""
    from tests.conftest import PBC_UM_PER_PX

    cells = _segmented_cells("lymphocyte", 40)
    good = 0
    for a, b in zip(cells[::2], cells[1::2]):
        img, ma, mb = _overlapping_pair(a, b, int(1.5 / PBC_UM_PER_PX))
        dets = detect(img, PBC_UM_PER_PX, config.detect, CROP_UM_PER_PX)
        on_a = sum(ma[int(d.y), int(d.x)] for d in dets)
        on_b = sum(mb[int(d.y), int(d.x)] for d in dets)
        good += on_a == 1 and on_b == 1
    assert len(cells) == 40
    assert good >= 12, good


def test_touching_erythroblasts_are_two_cells_not_two_lobes(config):
    """Real erythroblasts (PBC) laid side by side, touching: gap closing joins their round
    nuclei like the lobes of one neutrophil. Two large nuclei with centres 7.5 µm or more
    apart stay two cells (detect.separate_nucleus_*). Measured on these 20 pairs: 16 give one
    detection per cell with the rule, 13 without (with the earlier 3.5 µm gap and 8.5 µm
    separation: 13 and 9)."""
    from tests.conftest import PBC_UM_PER_PX

    cells = _segmented_cells("erythroblast", 40)
    assert len(cells) == 40
    off = config.detect.model_copy(update={"separate_nucleus_min_um2": 0.0})
    good = {}
    for name, params in (("on", config.detect), ("off", off)):
        good[name] = 0
        for a, b in zip(cells[::2], cells[1::2]):
            img, ma, mb = _overlapping_pair(a, b, 0)
            dets = detect(img, PBC_UM_PER_PX, params, CROP_UM_PER_PX)
            good[name] += (sum(ma[int(d.y), int(d.x)] for d in dets) == 1
                           and sum(mb[int(d.y), int(d.x)] for d in dets) == 1)
    assert good["on"] >= 12 and good["on"] >= good["off"] + 3, good
