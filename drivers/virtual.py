"""A virtual microscope: pymmcore-plus UniMMCore Python devices over a slide image."""

from __future__ import annotations

from pydantic import Field

from pipeline.params import Params


class VirtualParams(Params):
    """The ``acquisition.virtual:`` config section (the virtual microscope's devices)."""

    camera_width: int = Field(gt=0)
    camera_height: int = Field(gt=0)
    exposure_ms: float = Field(gt=0, description="exposure that renders the slide as stored")
    focus_z_um: float = Field(description="focal plane height at stage (0, 0)")
    tilt_x_um_per_mm: float
    tilt_y_um_per_mm: float
    blur_um_per_um: float = Field(ge=0, description="Gaussian blur sigma per µm of defocus")
    noise_sd: float = Field(ge=0, description="camera noise, grey levels")
    snap_failure_rate: float = Field(ge=0, le=1)
    stage_timeout_rate: float = Field(ge=0, le=1)
    z_limits_um: tuple[float, float]
    seed: int
