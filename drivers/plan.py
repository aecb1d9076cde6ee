"""Field planning with useq-schema: which stage positions to visit, in which order.

The counting area is a rectangle ``((x0, y0), (x1, y1))`` or a polygon (>= 3 vertices) in
stage µm. Fields tile it at a spacing of one field of view (no overlap, so no cell is seen
twice) in serpentine order (each row reversed, so the stage never jumps back across the
slide), and only fields lying wholly inside the area are kept.

The grid is made with an explicit field of view and turned into absolute positions here:
a useq grid plan left to take its size from the camera freezes the size it had when it was
first iterated, which is wrong if that happened before the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import useq
from shapely.geometry import Polygon, box

from drivers.acquisition import AcquisitionError

Area = Sequence[Sequence[float]]
"""Rectangle corners ``[[x0, y0], [x1, y1]]`` or polygon vertices ``[[x, y], ...]``, µm."""


@dataclass(frozen=True)
class FieldPlan:
    """Field centres in visiting order (stage µm) and the field of view they were made for;
    ``prescan`` is the low-magnification pre-scan's summary when one chose the fields."""

    positions: tuple[tuple[float, float], ...]
    fov_um: tuple[float, float]
    area: tuple[tuple[float, float], ...]
    prescan: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.positions)


def area_polygon(area: Area) -> Polygon:
    """The counting area as a shapely polygon; AcquisitionError if it is not a usable area."""
    try:
        pts = [(float(x), float(y)) for x, y in area]
    except (TypeError, ValueError):
        raise AcquisitionError(
            "counting area must be [[x0, y0], [x1, y1]] or a list of [x, y] vertices in µm"
        ) from None
    if len(pts) == 2:
        (x0, y0), (x1, y1) = pts
        poly = box(min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
    elif len(pts) >= 3:
        poly = Polygon(pts)
    else:
        raise AcquisitionError("counting area needs 2 corners or at least 3 vertices")
    if not poly.is_valid or poly.area <= 0:
        raise AcquisitionError(f"counting area {pts} is empty or self-intersecting")
    return poly


def plan_fields(
    area: Area,
    fov_width_um: float,
    fov_height_um: float,
    stage_limits_um: tuple[float, float, float, float] | None = None,
) -> FieldPlan:
    """Serpentine, non-overlapping fields of ``fov_width_um × fov_height_um`` inside ``area``.

    ``stage_limits_um`` ``(x0, y0, x1, y1)``: the area must lie within them (checked before
    any stage moves). Raises AcquisitionError when the area is outside the limits or too small
    for a single field.
    """
    poly = area_polygon(area)
    if stage_limits_um is not None:
        limits = box(*stage_limits_um)
        if not limits.buffer(1e-6).contains(poly):
            x0, y0, x1, y1 = (round(v, 1) for v in poly.bounds)
            lx0, ly0, lx1, ly1 = (round(v, 1) for v in stage_limits_um)
            raise AcquisitionError(
                f"counting area x {x0}..{x1}, y {y0}..{y1} µm is outside the stage limits "
                f"x {lx0}..{lx1}, y {ly0}..{ly1} µm"
            )
    grid = useq.GridFromPolygon(
        vertices=list(poly.exterior.coords)[:-1],
        fov_width=fov_width_um,
        fov_height=fov_height_um,
        overlap=0,
        mode="row_wise_snake",
    )
    inside = poly.buffer(1e-6)
    hw, hh = fov_width_um / 2, fov_height_um / 2
    positions = tuple(
        (float(p.x), float(p.y))
        for p in grid
        if p.x is not None
        and p.y is not None
        and inside.contains(box(p.x - hw, p.y - hh, p.x + hw, p.y + hh))
    )
    if not positions:
        raise AcquisitionError(
            f"counting area is smaller than one field of view ({fov_width_um:.0f} × "
            f"{fov_height_um:.0f} µm)"
        )
    coords = tuple((float(x), float(y)) for x, y in list(poly.exterior.coords)[:-1])
    return FieldPlan(positions, (fov_width_um, fov_height_um), coords)
