"""Software autofocus: coarse-then-fine Z search on the sharpness of the luminance."""

from __future__ import annotations

from pydantic import Field

from pipeline.params import Params


class AutofocusParams(Params):
    """The ``acquisition.autofocus:`` config section."""

    enabled: bool
    use_hardware: bool = Field(description="use the config's autofocus device when it names one")
    coarse_step_um: float = Field(gt=0)
    fine_step_um: float = Field(gt=0)
    max_search_um: float = Field(gt=0, description="give up beyond this distance from the start")
    metric_um_per_px: float = Field(gt=0, description="scale the sharpness is measured at")
