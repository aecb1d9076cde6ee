"""Low-magnification pre-scan: judge every planned field before the counting pass visits it.

Area selection changes a marrow differential, and at 100x each field the quality gate skips
still costs a stage move, a focus search and a snap. The pre-scan switches to a dry low-power
objective (a preset of a Micro-Manager config group), snaps the counting area in blocks of
planned fields, and runs the same quality gate as the counting pass (``pipeline.quality``)
on each field's footprint in those snaps, without its sharpness test (sharpness at low power
says nothing about focus at 100x). Fields the gate would skip leave the plan with their
reason. The kept fields are then ranked by area: squares of ``rank_area_fields`` × that many
fields, best first (most countable fields, then the most nucleated cells per field: the
cellular trails a marrow count is made in), serpentine within each area so the stage does
not jump about. The counting objective is put back, and its pixel size checked, before
anything is counted.

Z stays where it is during the pre-scan: a 10x objective's depth of field (about 8 µm)
spans a smear's tilt over one snap. On a system that oils the slide for 100x, the pre-scan
must run before oiling; the counting preset is where the lab's config puts the oiler.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

import numpy as np

from drivers.acquisition import AcquisitionError, PrescanParams
from drivers.plan import FieldPlan
from pipeline.detect import DetectParams
from pipeline.quality import QualityParams, assess_field

if TYPE_CHECKING:
    from drivers.micromanager import Microscope


def field_blocks(
    positions: tuple[tuple[float, float], ...], fov_um: tuple[float, float], per_snap: tuple[int, int]
) -> dict[tuple[int, int], list[int]]:
    """Plan indices grouped into blocks of ``per_snap`` (columns, rows) neighbouring fields.

    The plan's fields lie on a grid of one field of view, so each is indexed by its grid
    column and row from the plan's first corner; a block is ``per_snap`` of those.
    """
    pts = np.asarray(positions, np.float64)
    x0, y0 = pts.min(axis=0)
    blocks: dict[tuple[int, int], list[int]] = {}
    for i, (x, y) in enumerate(pts):
        col, row = round((x - x0) / fov_um[0]), round((y - y0) / fov_um[1])
        blocks.setdefault((col // per_snap[0], row // per_snap[1]), []).append(i)
    return blocks


def prescan(
    scope: Microscope,
    plan: FieldPlan,
    params: PrescanParams,
    quality: QualityParams,
    detect: DetectParams,
) -> FieldPlan:
    """The plan without the fields the quality gate judges unfit at low magnification.

    Returns a FieldPlan with the kept positions (in the plan's order) and ``prescan`` set to
    a summary: objective, its µm/px, snaps taken, fields planned and kept, and each left-out
    field's stage position and reason. Raises AcquisitionError when the objectives cannot be
    switched, the pre-scan objective has no pixel size or sees less than one counting field,
    or no field passes.
    """
    scope.check_objectives(params)
    count_px = scope.pixel_size_now()
    try:
        low_px = scope.use_objective(params)
        cam_w, cam_h = scope.camera_size
        fw, fh = plan.fov_um
        per_snap = (int(cam_w * low_px // fw), int(cam_h * low_px // fh))
        if not low_px > count_px or min(per_snap) < 1:
            raise AcquisitionError(
                f"pre-scan objective {params.objective!r} ({low_px:g} µm/px) does not see a "
                f"whole counting field ({fw:.0f} × {fh:.0f} µm)"
            )
        gate = quality.model_copy(update={"min_sharpness": 0.0})
        reasons: dict[int, str | None] = {}
        nucleated: dict[int, int] = {}
        blocks = field_blocks(plan.positions, plan.fov_um, per_snap)
        for key in _serpentine(blocks):
            members = blocks[key]
            xs = [plan.positions[i][0] for i in members]
            ys = [plan.positions[i][1] for i in members]
            cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
            scope.move_xy(cx, cy)
            snap = scope.snap_rgb()
            for i in members:
                x, y = plan.positions[i]
                left = int(round(cam_w / 2 + (x - fw / 2 - cx) / low_px))
                top = int(round(cam_h / 2 + (y - fh / 2 - cy) / low_px))
                w, h = int(round(fw / low_px)), int(round(fh / low_px))
                crop = snap[max(0, top): top + h, max(0, left): left + w]
                q = assess_field(crop, low_px, gate, detect)
                reasons[i], nucleated[i] = q.reason, q.nucleated
    finally:
        back = scope.use_objective(params, counting=True)
    if abs(back - count_px) > 1e-6 * count_px:
        raise AcquisitionError(
            f"after the pre-scan the counting objective {params.counting_objective!r} gives "
            f"{back:g} µm/px, not the {count_px:g} µm/px it had before"
        )
    order = ranked(plan, [i for i in range(len(plan)) if reasons[i] is None], nucleated,
                   params.rank_area_fields)
    kept = tuple(plan.positions[i] for i in order)
    left_out = [
        {"x": round(plan.positions[i][0], 2), "y": round(plan.positions[i][1], 2),
         "reason": f"pre-scan {reasons[i]}"}
        for i in sorted(reasons) if reasons[i] is not None
    ]
    summary: dict[str, Any] = {
        "objective": params.objective,
        "um_per_px": low_px,
        "snaps": len(blocks),
        "planned": len(plan),
        "kept": len(kept),
        "left_out_by_reason": dict(Counter(r["reason"].split(":")[0].removeprefix("pre-scan ")
                                           for r in left_out)),
        "left_out": left_out,
        "rank_area_fields": params.rank_area_fields,
    }
    if not kept:
        raise AcquisitionError(
            f"the pre-scan kept none of the {len(plan)} planned fields "
            f"({', '.join(f'{k} {n}' for k, n in summary['left_out_by_reason'].items())})"
        )
    return FieldPlan(kept, plan.fov_um, plan.area, summary)


def ranked(plan: FieldPlan, kept: list[int], nucleated: dict[int, int], area_fields: int
           ) -> list[int]:
    """Plan indices ``kept`` in visiting order: areas of ``area_fields`` × ``area_fields``
    fields, best first (most kept fields, then the highest median nucleated count), each
    area's fields in plan order (serpentine). Ties keep plan order."""
    areas = field_blocks(plan.positions, plan.fov_um, (area_fields, area_fields))
    keep = set(kept)
    scored = []
    for members in areas.values():
        mine = [i for i in members if i in keep]
        if mine:
            score = (len(mine), float(np.median([nucleated[i] for i in mine])))
            scored.append((score, min(mine), sorted(mine)))
    scored.sort(key=lambda t: (-t[0][0], -t[0][1], t[1]))
    return [i for *_, mine in scored for i in mine]


def _serpentine(blocks: dict[tuple[int, int], list[int]]) -> list[tuple[int, int]]:
    rows = sorted({r for _, r in blocks})
    order = []
    for n, row in enumerate(rows):
        cols = sorted(c for c, r in blocks if r == row)
        order += [(c, row) for c in (cols if n % 2 == 0 else cols[::-1])]
    return order
