"""What every acquisition backend shares: a field, a source of fields, counting to a target.

A *field source* (the Micro-Manager driver, the scanner/WSI driver) produces a slide's fields
in a fixed order, each with a stable index. ``count_slide`` analyses them one by one until the
counted leukocytes reach the target, handing each finished field to ``on_field`` (the daemon
commits it there) before the next is counted. Because indices are stable and each committed
field is final, a restart with ``start_index = last committed + 1`` and the committed count
resumes exactly: no cell is lost or counted twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np
from pydantic import Field

from drivers.autofocus import AutofocusParams
from drivers.virtual import VirtualParams
from pipeline.errors import ImageError, MarrowError
from pipeline.params import Params
from pipeline.quality import HARDWARE_REASONS, QualityParams

if TYPE_CHECKING:
    from pipeline.analyze import CellResult


class HardwareFault(MarrowError):
    """The microscope delivers fields no smear explains (dark, none in focus): the slide waits
    for the hardware to be mended instead of counting on through its area."""


class AcquisitionError(MarrowError):
    """A microscope or slide that cannot be acquired (bad config, bad area, repeated faults)."""


class PrescanParams(Params):
    """The ``acquisition.prescan:`` config section (drivers/prescan.py)."""

    enabled: bool = Field(description="judge the counting area at low magnification first")
    config_group: str = Field(min_length=1, description="Micro-Manager group that switches objectives")
    objective: str = Field(min_length=1, description="the group's preset for the pre-scan objective")
    counting_objective: str = Field(min_length=1, description="the group's preset to count with")
    rank_area_fields: int = Field(
        ge=1, description="kept fields are visited by areas this many fields square, best first")


class AcquisitionParams(Params):
    """The ``acquisition:`` config section (defaults in config/default.yaml)."""

    target: int = Field(gt=0, description="counted leukocytes per slide")
    area_um: tuple[tuple[float, float], ...] | None = Field(
        description="counting area in stage µm: [[x0,y0],[x1,y1]] rectangle corners or >= 3 "
        "polygon vertices; null = the whole slide (virtual) / stage limits"
    )
    stage_limits_um: tuple[float, float, float, float] | None = Field(
        description="real hardware: [x0, y0, x1, y1] µm the stage may visit; null = unchecked"
    )
    max_fields: int = Field(gt=0, description="never visit more fields than this per slide")
    prefetch_fields: int = Field(
        ge=1, description="fields acquired ahead of analysis (stage keeps moving meanwhile)"
    )
    retries: int = Field(ge=0, description="retries of a failed snap or stage move")
    backoff_s: float = Field(ge=0, description="first retry delay; doubles on each retry")
    autofocus: AutofocusParams
    quality: QualityParams
    prescan: PrescanParams
    virtual: VirtualParams


@dataclass(frozen=True)
class FieldResult:
    """One field of a slide, acquired and (unless skipped) analysed.

    ``index`` is the field's stable position in the slide's plan (0-based). ``stage_x``,
    ``stage_y`` are the stage position of the field centre in µm (for a scanned slide: the
    tile centre in slide µm), ``stage_z`` the focus position used (None when unknown).
    ``tile`` names the tile of a scanned slide. ``image`` is RGB uint8 ``(H, W, 3)`` (None when
    there is none to analyse); a field the quality gate skipped keeps it too, since its red
    cells still check the pixel size (a wrong one makes every field look clumped), and the
    service does not store it. ``skipped_reason`` says why a field was skipped (e.g. "thin: 4
    nucleated cells < 10"). ``quality`` holds the gate's measurements. ``cells`` are the analysis
    results (empty until counted, and for skipped fields).
    """

    index: int
    stage_x: float
    stage_y: float
    stage_z: float | None
    tile: str | None
    um_per_px: float
    image: np.ndarray | None
    quality: dict[str, Any]
    skipped_reason: str | None
    cells: list[CellResult] = field(default_factory=list)

    @property
    def n_counted(self) -> int:
        """Counted leukocytes in this field (duplicates and non-leukocytes left out)."""
        return sum(1 for c in self.cells if c.counted)


@runtime_checkable
class FieldSource(Protocol):
    """Produces a slide's fields in a fixed order, each index once.

    ``fields(start_index)`` yields FieldResults with empty ``cells`` for indices
    ``start_index, start_index + 1, ...`` (skipped fields included, with their reason)
    until the counting area is exhausted. It raises AcquisitionError when the slide cannot
    be acquired (the message is the reason). Closing the iterator stops acquisition at once
    (e.g. cancels the running MDA); fields acquired ahead but not yet taken are dropped.
    """

    def fields(self, start_index: int = 0) -> Iterator[FieldResult]: ...


Analyzer = Callable[[np.ndarray, float], "Sequence[CellResult]"]


def count_slide(
    source: FieldSource,
    analyze: Analyzer,
    target: int,
    start_index: int = 0,
    counted_so_far: int = 0,
    on_field: Callable[[FieldResult], None] = lambda f: None,
    should_stop: Callable[[], bool] = lambda: False,
    fault_after: int = 0,
) -> str:
    """Count a slide's fields until ``target`` counted leukocytes, then stop acquisition.

    ``analyze(rgb, um_per_px) -> list[CellResult]`` runs on this thread while the source keeps
    acquiring on its own, so acquisition is not blocked by analysis. Each field (skipped ones
    included) is passed to ``on_field`` before the next is taken; the field that reaches the
    target is the last one counted. A field whose image analysis rejects (ImageError) is
    recorded as skipped with the reason instead of failing the slide.

    Returns why it stopped: "target_reached", "area_exhausted", "stopped" (``should_stop()``
    became true) or "failed: <reason>" (the source raised AcquisitionError).

    A field the gate found dark or out of focus waits: the next good field hands it on as
    skipped, but ``fault_after`` such fields in a row (0: never) raise HardwareFault with none
    of them handed on, so the slide resumes at the first of them once the lamp, shutter or
    focus is mended (a dark lamp had "used up" a slide's whole area with 0 cells counted).
    """
    if target <= 0:
        raise AcquisitionError(f"target must be a positive number of cells, got {target}")
    if start_index < 0 or counted_so_far < 0:
        raise AcquisitionError("start_index and counted_so_far must not be negative")
    if counted_so_far >= target:
        return "target_reached"
    counted = counted_so_far
    next_index = start_index
    suspect: list[FieldResult] = []
    fields = source.fields(start_index)
    try:
        for fld in fields:
            if should_stop():
                return "stopped"
            if fld.index < next_index:
                continue  # a repeat of a field already handed on: never count it twice
            next_index = fld.index + 1
            if fld.skipped_reason and fld.skipped_reason.startswith(HARDWARE_REASONS):
                suspect.append(fld)
                if fault_after and len(suspect) >= fault_after:
                    reason = suspect[-1].skipped_reason
                    raise HardwareFault(
                        f"{len(suspect)} fields in a row from field {suspect[0].index} were "
                        f"{reason}" + ("" if reason.startswith("dark") else
                                       ": check the focus drive and the rough focus"))
                continue
            for s in suspect:
                on_field(s)
            suspect.clear()
            if fld.skipped_reason is None:
                fld = _analysed(fld, analyze)
            on_field(fld)
            counted += fld.n_counted
            if counted >= target:
                return "target_reached"
        if should_stop():
            return "stopped"
        for s in suspect:
            on_field(s)
        return "area_exhausted"
    except AcquisitionError as exc:
        return f"failed: {exc}"
    finally:
        close = getattr(fields, "close", None)
        if close is not None:
            close()


def _analysed(fld: FieldResult, analyze: Analyzer) -> FieldResult:
    if fld.image is None:
        return dataclasses.replace(fld, skipped_reason="no image")
    try:
        cells = list(analyze(fld.image, fld.um_per_px))
    except ImageError as exc:
        return dataclasses.replace(fld, image=None, skipped_reason=f"unanalysable: {exc}")
    return dataclasses.replace(fld, cells=cells)
