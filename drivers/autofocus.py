"""Software autofocus: coarse-then-fine Z search on the sharpness of the luminance.

pymmcore-plus has no software autofocus, so this searches Z itself, through two callables
(move the focus drive, snap an RGB frame), so it works on any driver. The metric is the
variance of the Laplacian of luminance (``pipeline.quality.sharpness``) at a fixed physical
scale.

The search starts at the last focus of the neighbouring field (the focal plane of a smear
changes slowly across it), which keeps Z moves per field low:

1. fine: sharpness at ``z0`` and ``z0 ± fine``, then up to one coarse step's worth of fine
   steps towards higher sharpness; a peak found there is focus (the usual case);
2. coarse: otherwise climb on in ``coarse`` steps until sharpness falls (never further
   than ``max_search_um`` from ``z0``), then fine steps around the coarse peak;
3. a parabola through the peak and its two neighbours places focus between the steps.

A field with no structure (empty glass) has a flat metric: focus stays at ``z0``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from pipeline.params import Params
from pipeline.quality import sharpness


class AutofocusParams(Params):
    """The ``acquisition.autofocus:`` config section."""

    enabled: bool
    use_hardware: bool = Field(description="use the config's autofocus device when it names one")
    coarse_step_um: float = Field(gt=0)
    fine_step_um: float = Field(gt=0)
    max_search_um: float = Field(gt=0, description="never search further than this from z0")
    metric_um_per_px: float = Field(gt=0, description="scale the sharpness is measured at")
    min_contrast: float = Field(
        ge=0, description="relative sharpness spread below which a field counts as featureless"
    )


@dataclass(frozen=True)
class FocusResult:
    """``z``: the focus found (µm), ``found``: False when the field was featureless (z = z0);
    ``moves``: Z moves made; ``sharpness``: metric at the best sampled position."""

    z: float
    found: bool
    moves: int
    sharpness: float


def find_focus(
    move_z: Callable[[float], None],
    snap: Callable[[], np.ndarray],
    z0: float,
    um_per_px: float,
    params: AutofocusParams,
    z_limits: tuple[float, float] | None = None,
) -> FocusResult:
    """Search focus around ``z0`` (µm, where the drive is now) and leave the drive at it.

    ``move_z(z)`` moves the focus drive (absolute µm), ``snap()`` returns RGB uint8
    ``(H, W, 3)`` at the current Z. Returns the focus with the number of Z moves it took.
    """
    lo, hi = z_limits if z_limits is not None else (-np.inf, np.inf)
    lo, hi = max(lo, z0 - params.max_search_um), min(hi, z0 + params.max_search_um)
    samples: dict[float, float] = {}
    moves = 0
    at = z0

    def s(z: float) -> float:
        nonlocal moves, at
        z = round(float(np.clip(z, lo, hi)), 4)
        if z not in samples:
            if z != at:
                move_z(z)
                moves += 1
                at = z
            samples[z] = sharpness(snap(), um_per_px, params.metric_um_per_px)
        return samples[z]

    def climb(start: float, step: float, max_steps: int = 10**6) -> tuple[float, bool]:
        """From ``start``, step towards higher sharpness until it falls (or ``max_steps``);
        returns the best z and whether a peak was bracketed."""
        best = start
        up, down = s(best + step), s(best - step)
        if max(up, down) <= s(best):
            return best, True
        step = step if up > down else -step
        for _ in range(max_steps):
            nxt = round(best + step, 4)
            if not lo <= nxt <= hi:
                return best, True  # the search range ends here
            if s(nxt) <= s(best):
                return best, True
            best = nxt
        return best, False

    f, c = params.fine_step_um, params.coarse_step_um
    # Fine first: the start is usually within a few fine steps of focus.
    best, bracketed = climb(round(z0, 4), f, max_steps=max(1, int(round(c / f))))
    if not bracketed:  # far off: coarse steps, then fine around the coarse peak
        best, _ = climb(best, c)
        best, _ = climb(best, f)
    values = np.array(list(samples.values()))
    if values.max() - values.min() < params.min_contrast * max(values.max(), 1e-9):
        if at != z0:
            move_z(z0)
            moves += 1
        return FocusResult(z0, False, moves, float(values.max()))
    z = _parabola_peak(best, f, s(best - f), s(best), s(best + f))
    z = float(np.clip(z, lo, hi))
    if abs(z - at) > 1e-6:
        move_z(z)
        moves += 1
    return FocusResult(z, True, moves, s(best))


def _parabola_peak(z: float, h: float, below: float, mid: float, above: float) -> float:
    """Vertex of the parabola through (z-h, below), (z, mid), (z+h, above), kept within ±h."""
    denom = below - 2 * mid + above
    if denom >= 0:  # not a maximum (flat or convex): keep the sampled best
        return z
    return z + float(np.clip(0.5 * h * (below - above) / denom, -h, h))
