"""Scanned slides as fields: tile whole-slide images inside a counting area, count them in order.

A scanner delivers either single fields (one image per camera field) or whole-slide images.
``plan_file`` turns one file into a frozen list of tiles (full-resolution pixel rectangles):

- an image no larger than about one field is one field, as it is;
- a larger image is cut into a grid of non-overlapping fields of ``field_um`` (the size of a
  100x camera field), kept inside the counting area, and put in a seeded *spread* order so
  that stopping at N counted cells samples the whole area rather than its first rows.

The counting area is either given (a rectangle or polygon in slide µm) or found automatically
from a low-resolution pass (``overview_um_per_px``): a field is kept where red cells cover the
glass in a monolayer (``min_cover``..``max_cover``; less is the thin feather edge, more the
thick head) and the estimated number of nucleated cells per field is in
``min_nucleated``..``max_nucleated``. The per-field quality gate (pipeline.quality) then judges
each field at full resolution, exactly as on the microscope.

``SlideFields`` is the FieldSource over a slide's planned files; the plan is plain JSON
(``SlidePlan.as_dict``) stored with the slide, so a restarted daemon rebuilds the same source
with ``source_from_plan`` and resumes at the next field index.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from pydantic import Field

from drivers.acquisition import AcquisitionError, FieldResult
from drivers.slide_image import open_slide
from pipeline.detect import DetectParams, nucleus_map
from pipeline.errors import ImageError
from pipeline.params import Params
from pipeline.quality import QualityParams, assess_field

Tile = tuple[int, int, int, int]
"""A field's rectangle ``(x, y, w, h)`` in full-resolution pixels of its file."""

PLAN_VERSION = 1


class WsiParams(Params):
    """The ``watch.wsi:`` config section: how scanned slides become fields."""

    field_um: tuple[float, float] = Field(description="field size (w, h) in µm")
    max_um_per_px: float = Field(gt=0, description="coarser scans are refused")
    single_field_factor: float = Field(
        ge=1, description="an image up to this many fields wide and high is one field")
    overview_um_per_px: float = Field(gt=0, description="scale of the automatic-area pass")
    cover_min_od: float = Field(
        gt=0, description="green optical density above the slide's background = covered")
    min_cover: float = Field(ge=0, le=1, description="less cell cover: thin feather edge")
    max_cover: float = Field(ge=0, le=1, description="more cell cover: thick head")
    min_nucleated: float = Field(ge=0, description="fewer nucleated cells per field: too thin")
    max_nucleated: float = Field(gt=0, description="more per field: too crowded to count")
    order: Literal["spread", "raster"]
    seed: int
    max_fields_per_file: int = Field(gt=0)


@dataclass(frozen=True)
class PlannedFile:
    """One file of a slide and the fields planned in it."""

    path: str
    sha256: str
    format: str
    width: int
    height: int
    um_per_px: float
    um_per_px_source: str
    tiles: tuple[Tile, ...]
    area: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "sha256": self.sha256, "format": self.format,
            "width": self.width, "height": self.height, "um_per_px": self.um_per_px,
            "um_per_px_source": self.um_per_px_source,
            "tiles": [list(t) for t in self.tiles], "area": self.area,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PlannedFile":
        return cls(
            path=d["path"], sha256=d["sha256"], format=d["format"], width=int(d["width"]),
            height=int(d["height"]), um_per_px=float(d["um_per_px"]),
            um_per_px_source=d["um_per_px_source"],
            tiles=tuple(tuple(int(v) for v in t) for t in d["tiles"]),  # type: ignore[misc]
            area=dict(d.get("area") or {}),
        )


@dataclass(frozen=True)
class SlidePlan:
    """A slide's frozen field plan: files in order; field indices run through them."""

    files: tuple[PlannedFile, ...]

    @property
    def n_fields(self) -> int:
        return sum(len(f.tiles) for f in self.files)

    def as_dict(self) -> dict[str, Any]:
        return {"driver": "folder", "version": PLAN_VERSION,
                "files": [f.as_dict() for f in self.files]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SlidePlan":
        if d.get("driver") != "folder" or d.get("version") != PLAN_VERSION:
            raise AcquisitionError("slide plan is not a folder-watcher plan of this version")
        return cls(tuple(PlannedFile.from_dict(f) for f in d["files"]))


def field_px(um_per_px: float, params: WsiParams) -> tuple[int, int]:
    """The field size in pixels of a file at ``um_per_px``."""
    return (max(16, round(params.field_um[0] / um_per_px)),
            max(16, round(params.field_um[1] / um_per_px)))


def tile_grid(width: int, height: int, fw: int, fh: int) -> list[Tile]:
    """Non-overlapping ``fw``×``fh`` fields wholly inside a ``width``×``height`` image, centred."""
    nx, ny = width // fw, height // fh
    ox, oy = (width - nx * fw) // 2, (height - ny * fh) // 2
    return [(ox + i * fw, oy + j * fh, fw, fh) for j in range(ny) for i in range(nx)]


def in_area(tiles: Sequence[Tile], area_um: Sequence[Sequence[float]], um_per_px: float) -> list[Tile]:
    """Tiles whose centre lies inside ``area_um``: two corners of a rectangle, or >= 3 polygon
    vertices, in µm from the image's top-left corner."""
    pts = np.asarray(area_um, np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or len(pts) < 2:
        raise AcquisitionError(f"counting area must be [[x0,y0],[x1,y1]] or a polygon, got {area_um}")
    if len(pts) == 2:
        (x0, y0), (x1, y1) = pts
        pts = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)
    poly = (pts / um_per_px).astype(np.float32).reshape(-1, 1, 2)
    return [t for t in tiles
            if cv2.pointPolygonTest(poly, (t[0] + t[2] / 2, t[1] + t[3] / 2), False) >= 0]


def score_tiles(
    overview: np.ndarray, downsample: float, tiles: Sequence[Tile], um_per_px: float,
    params: WsiParams, detect: DetectParams,
) -> list[tuple[float, int]]:
    """Per tile ``(cover, nucleated)`` from a low-resolution overview.

    ``overview`` is RGB uint8 of the whole image shrunk by ``downsample``; ``cover`` is the
    fraction of the tile darker than the background (cells rather than glass or plasma),
    ``nucleated`` the number of nucleus blobs (stained chromatin, as the detector sees it)
    whose centre falls in the tile.
    """
    ov_um = um_per_px * downsample
    # Cover: green optical density against the slide's own background (its brightest
    # percent, leaving out the white fill outside a scanned region): stain and lamp vary.
    green = overview[:, :, 1].astype(np.float32)
    lit = green[green < 254.5]
    background = float(np.percentile(lit, 99)) if lit.size else 255.0
    od = np.log10(background / np.maximum(green, 1.0))
    covered = (od > params.cover_min_od).astype(np.float32)
    nuc = (nucleus_map(overview, detect) >= detect.min_saturation).astype(np.uint8)
    n, _, stats, centroids = cv2.connectedComponentsWithStats(nuc, connectivity=8)
    min_px = max(1.0, detect.min_nucleus_um2 / (ov_um * ov_um))
    keep = stats[1:, cv2.CC_STAT_AREA] >= min_px
    cx, cy = centroids[1:, 0][keep] * downsample, centroids[1:, 1][keep] * downsample
    integral = cv2.integral(covered)
    h, w = covered.shape
    out = []
    for x, y, tw, th in tiles:
        a0, b0 = min(w, int(x / downsample)), min(h, int(y / downsample))
        a1, b1 = min(w, max(a0 + 1, int(math.ceil((x + tw) / downsample)))), \
            min(h, max(b0 + 1, int(math.ceil((y + th) / downsample))))
        area = max(1, (a1 - a0) * (b1 - b0))
        cover = (integral[b1, a1] - integral[b0, a1] - integral[b1, a0] + integral[b0, a0]) / area
        inside = int(np.count_nonzero((cx >= x) & (cx < x + tw) & (cy >= y) & (cy < y + th)))
        out.append((float(cover), inside))
    return out


def order_tiles(tiles: Sequence[Tile], order: str, seed: int) -> list[Tile]:
    """Raster order, or a seeded permutation (spread) so a partial count samples the area."""
    tiles = list(tiles)
    if order == "spread":
        perm = np.random.default_rng(seed).permutation(len(tiles))
        tiles = [tiles[i] for i in perm]
    return tiles


def plan_file(
    path: str | Path,
    sha256: str,
    fallback_um_per_px: float | None,
    params: WsiParams,
    detect: DetectParams,
    area_um: Sequence[Sequence[float]] | None = None,
) -> PlannedFile:
    """Open ``path`` and plan its fields. Raises ImageError when it cannot be counted."""
    path = Path(path)
    with open_slide(path) as slide:
        um, source = slide.um_per_px, slide.um_per_px_source
        if um is None:
            if fallback_um_per_px is None:
                raise ImageError(f"{path.name}: no pixel size in the file's metadata and no "
                                 "um_per_px fallback configured for this folder")
            um, source = float(fallback_um_per_px), "folder fallback"
        if um > params.max_um_per_px:
            raise ImageError(f"{path.name}: scanned at {um:.3g} µm/px, coarser than the "
                             f"{params.max_um_per_px:g} µm/px that cells can be counted at")
        fw, fh = field_px(um, params)
        area: dict[str, Any] = {}
        f = params.single_field_factor
        if slide.width <= f * fw and slide.height <= f * fh:
            tiles: list[Tile] = [(0, 0, slide.width, slide.height)]
            area = {"mode": "single field"}
        else:
            grid = tile_grid(slide.width, slide.height, fw, fh)
            if not grid:
                grid = [(0, 0, slide.width, slide.height)]
            if area_um is not None:
                tiles = in_area(grid, area_um, um)
                area = {"mode": "given", "area_um": [list(p) for p in area_um]}
            else:
                tiles, area = _auto_area(slide, um, grid, params, detect)
                if not tiles:
                    # Counted, it would only reach review as 0 of N cells: say why instead.
                    why = ", ".join(f"{n} {k}" for k, n in area["left_out"].items() if n)
                    raise ImageError(
                        f"{path.name}: no area of the slide looks countable ({len(grid)} "
                        f"field-sized areas: {why}): not a Wright–Giemsa smear, or give the "
                        "folder an area_um")
            tiles = order_tiles(tiles, params.order, params.seed)[: params.max_fields_per_file]
            area.update(grid=len(grid), kept=len(tiles), field_px=[fw, fh])
        return PlannedFile(str(path), sha256, slide.format, slide.width, slide.height, float(um),
                           source or "", tuple(tiles), area)


def _auto_area(slide: Any, um: float, grid: list[Tile], params: WsiParams,
               detect: DetectParams) -> tuple[list[Tile], dict[str, Any]]:
    target = max(1.0, params.overview_um_per_px / um)
    max_side = max(16, int(max(slide.width, slide.height) / target))
    overview, ds = slide.read_overview(max_side)
    scores = score_tiles(overview, ds, grid, um, params, detect)
    tiles, why = [], {"thin": 0, "thick": 0, "few nucleated": 0, "crowded": 0}
    for t, (cover, nucleated) in zip(grid, scores):
        if cover < params.min_cover:
            why["thin"] += 1
        elif cover > params.max_cover:
            why["thick"] += 1
        elif nucleated < params.min_nucleated:
            why["few nucleated"] += 1
        elif nucleated > params.max_nucleated:
            why["crowded"] += 1
        else:
            tiles.append(t)
    return tiles, {"mode": "automatic", "overview_um_per_px": round(um * ds, 4), "left_out": why}


class SlideFields:
    """FieldSource over a slide's planned files: field ``i`` is the i-th tile through them.

    Each field is read at full resolution, judged by the quality gate (skipped fields keep
    their reason and carry no image) and yielded with empty ``cells``. A file that cannot be
    opened or decoded any more raises AcquisitionError naming it.
    """

    def __init__(self, plan: SlidePlan, quality: QualityParams, detect: DetectParams) -> None:
        self.plan, self.quality, self.detect = plan, quality, detect

    def fields(self, start_index: int = 0) -> Iterator[FieldResult]:
        index = 0
        for pf in self.plan.files:
            if start_index >= index + len(pf.tiles):
                index += len(pf.tiles)
                continue
            try:
                slide = open_slide(pf.path)
            except ImageError as exc:
                raise AcquisitionError(str(exc)) from None
            with slide:
                for x, y, w, h in pf.tiles:
                    if index >= start_index:
                        yield self._field(slide, pf, index, (x, y, w, h))
                    index += 1

    def _field(self, slide: Any, pf: PlannedFile, index: int, tile: Tile) -> FieldResult:
        x, y, w, h = tile
        try:
            rgb = slide.read_region(x, y, w, h)
        except ImageError as exc:
            raise AcquisitionError(str(exc)) from None
        q = assess_field(rgb, pf.um_per_px, self.quality, self.detect)
        skipped = q.reason
        return FieldResult(
            index=index,
            stage_x=(x + w / 2) * pf.um_per_px,
            stage_y=(y + h / 2) * pf.um_per_px,
            stage_z=None,
            tile=f"{pf.path}#{x},{y},{w},{h}",
            um_per_px=pf.um_per_px,
            image=rgb,
            quality=q.as_dict(),
            skipped_reason=skipped,
        )


def source_from_plan(plan: dict[str, Any], quality: QualityParams, detect: DetectParams) -> SlideFields:
    """Rebuild a folder slide's FieldSource from the plan stored with it (``Slide.plan``)."""
    return SlideFields(SlidePlan.from_dict(plan), quality, detect)
