"""Field planning: serpentine, one field of view apart, inside the area and the stage."""

from __future__ import annotations

import numpy as np
import pytest
from shapely.geometry import Polygon, box

from drivers.acquisition import AcquisitionError
from drivers.plan import plan_fields


def test_rectangle_is_tiled_serpentine_without_overlap():
    plan = plan_fields([[100, 50], [800, 500]], 138.8, 104.0)
    pos = np.array(plan.positions)
    assert len(plan) == 5 * 4  # 700/138.8 -> 5 columns, 450/104 -> 4 rows
    rows = [pos[pos[:, 1] == y] for y in sorted(set(pos[:, 1]), key=lambda v: -v)]
    assert len(rows) == 4
    for i, row in enumerate(rows):
        assert np.allclose(np.diff(row[:, 0]), 138.8 if i % 2 == 0 else -138.8)  # snake
    # consecutive fields are neighbours: the stage never jumps across the slide
    steps = np.hypot(*np.diff(pos, axis=0).T)
    assert steps.max() == pytest.approx(138.8)
    # no two fields overlap, every field lies inside the area
    fields = [box(x - 69.4, y - 52, x + 69.4, y + 52) for x, y in plan.positions]
    area = box(100, 50, 800, 500)
    assert all(area.buffer(1e-6).contains(f) for f in fields)
    assert all(a.intersection(b).area < 1e-6 for i, a in enumerate(fields) for b in fields[i + 1 :])


def test_polygon_area_keeps_only_fields_inside_it():
    tri = [[0, 0], [1000, 0], [0, 1000]]
    plan = plan_fields(tri, 100, 100)
    poly = Polygon(tri)
    assert len(plan) > 20
    for x, y in plan.positions:
        assert poly.buffer(1e-6).contains(box(x - 50, y - 50, x + 50, y + 50))
    # the triangle's corner far from the right angle holds no full field
    assert not any(x > 900 for x, _ in plan.positions)


def test_area_outside_the_stage_limits_is_refused():
    with pytest.raises(AcquisitionError, match="outside the stage limits"):
        plan_fields([[0, 0], [500, 500]], 50, 50, stage_limits_um=(0, 0, 400, 400))
    assert len(plan_fields([[0, 0], [400, 400]], 50, 50, stage_limits_um=(0, 0, 400, 400))) == 64


@pytest.mark.parametrize(
    "area, message",
    [
        ([[0, 0], [10, 10]], "smaller than one field"),
        ([[0, 0]], "2 corners or at least 3"),
        ([[0, 0], [1, 1], [0, 1], [1, 0]], "self-intersecting"),
        ([["a", 0], [1, 1]], "counting area must be"),
    ],
)
def test_unusable_areas_get_a_clear_error(area, message):
    with pytest.raises(AcquisitionError, match=message):
        plan_fields(area, 50, 50)
