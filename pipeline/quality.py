"""A cheap field-quality gate: is a field worth counting, and if not, why."""

from __future__ import annotations

from pydantic import Field

from pipeline.params import Params


class QualityParams(Params):
    """The ``acquisition.quality:`` config section."""

    enabled: bool
    work_um_per_px: float = Field(gt=0)
    nucleus_min_area_um2: float = Field(gt=0)
    min_nucleated: int = Field(ge=0, description="fewer per field suggests blood dilution")
    max_nuclear_fraction: float = Field(gt=0, le=1, description="denser: particle centre")
    max_cell_area_um2: float = Field(gt=0, description="a nuclear blob larger is a clump")
    max_clumped_fraction: float = Field(gt=0, le=1)
    min_sharpness: float = Field(ge=0, description="normalised Laplacian variance")
