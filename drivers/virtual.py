"""A virtual microscope: pymmcore-plus UniMMCore Python devices over a slide image.

The devices behave like a motorised 100x system: an XY stage whose coordinates are µm on the
slide (x right, y down, (0, 0) the slide's top-left corner; stage limits = the slide's
extent), a Z stage, a lamp (shutter) and an RGB camera that renders the field of view centred
at the stage position, read lazily from the slide so a large slide is never loaded whole.
Focus follows a tilted plane ``z_focus(x, y)``; a field away from it is blurred with a
Gaussian of sigma ``blur_um_per_um * |z - z_focus|`` µm. Noise and faults (failed snaps,
stage timeouts) can be injected at configured rates, with a seeded generator.

The camera's pixel size equals the slide's (µm/px), set through a Micro-Manager pixel-size
config, so the driver above reads it like on any real system. A nosepiece (state device,
switched through the ``Objective`` config group like a real turret) holds the 100x counting
objective and a 10x pre-scan objective; at 10x the camera sees ten times the area, read from
a coarser pyramid level of the slide.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np
from pydantic import Field

from pipeline.params import Params

try:  # pymmcore-plus is a hard dependency; the import is only slow, not optional
    from pymmcore_plus.experimental.unicore import (
        ShutterDevice,
        SimpleCameraDevice,
        StageDevice,
        StateDevice,
        UniMMCore,
        XYStageDevice,
    )
except ImportError as exc:  # pragma: no cover
    raise ImportError(f"pymmcore-plus with unicore is required: {exc}") from exc

from drivers.pymmcore_logging import quiet_pymmcore_logging

quiet_pymmcore_logging()


class VirtualParams(Params):
    """The ``acquisition.virtual:`` config section (the virtual microscope's devices)."""

    camera_width: int = Field(gt=0)
    camera_height: int = Field(gt=0)
    packed_rgb32: bool = Field(
        description="camera returns 32bitRGB (BGRA packed in uint32) like real colour cameras"
    )
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


class SlideView(Protocol):
    """What the camera needs of a slide (drivers/slide_image.py's SlideImage has it)."""

    width: int
    height: int

    def read_region(self, x: int, y: int, w: int, h: int) -> np.ndarray: ...


GLASS_RGB = (242, 240, 244)
"""Empty glass under bright-field illumination: what the camera sees off the smear."""

CAMERA, XY_STAGE, Z_STAGE, LAMP, NOSEPIECE = "VCamera", "VXYStage", "VZStage", "VLamp", "VNosepiece"
PIXEL_CONFIG = "Virtual100x"
OBJECTIVE_GROUP = "Objective"
OBJECTIVES = {"100x": (1.0, 1.0), "10x": (10.0, 0.2)}
"""Nosepiece labels: (slide pixels one camera pixel spans, defocus blur relative to 100x).
Blur per µm of defocus scales with the numerical aperture: 10x NA 0.25 against 100x NA 1.25."""


class DeviceFault(RuntimeError):
    """An injected hardware fault (failed snap, stage timeout)."""


@dataclass(frozen=True)
class FocalPlane:
    """The slide's true focal plane in stage µm: ``z = z0 + tx * x/1000 + ty * y/1000``."""

    z0_um: float
    tilt_x_um_per_mm: float
    tilt_y_um_per_mm: float

    def z_at(self, x_um: float, y_um: float) -> float:
        return self.z0_um + (self.tilt_x_um_per_mm * x_um + self.tilt_y_um_per_mm * y_um) / 1000


class _Faults:
    """Seeded fault injection shared by the devices (thread-safe)."""

    def __init__(self, snap_rate: float, stage_rate: float, seed: int) -> None:
        self.snap_rate, self.stage_rate = snap_rate, stage_rate
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self.snap_failures = 0
        self.stage_timeouts = 0

    def snap(self) -> None:
        with self._lock:
            if self.snap_rate and self._rng.random() < self.snap_rate:
                self.snap_failures += 1
                raise DeviceFault("virtual camera: snap failed (injected fault)")

    def stage(self, label: str) -> None:
        with self._lock:
            if self.stage_rate and self._rng.random() < self.stage_rate:
                self.stage_timeouts += 1
                raise DeviceFault(f"virtual {label}: move timed out (injected fault)")


class VirtualXYStage(XYStageDevice):
    """XY stage in slide µm, limited to the slide's extent."""

    def __init__(self, limits_um: tuple[float, float, float, float], faults: _Faults) -> None:
        super().__init__()
        self.limits_um = limits_um  # x0, y0, x1, y1
        self._faults = faults
        self._pos = ((limits_um[0] + limits_um[2]) / 2, (limits_um[1] + limits_um[3]) / 2)
        self.moves = 0

    def set_position_um(self, x: float, y: float) -> None:
        x0, y0, x1, y1 = self.limits_um
        if not (x0 <= x <= x1 and y0 <= y <= y1):
            raise ValueError(
                f"XY ({x:.1f}, {y:.1f}) µm is outside the stage limits "
                f"x {x0:.0f}..{x1:.0f}, y {y0:.0f}..{y1:.0f}"
            )
        self._faults.stage("XY stage")
        self._pos = (float(x), float(y))
        self.moves += 1

    def get_position_um(self) -> tuple[float, float]:
        return self._pos

    def home(self) -> None:
        self._pos = (self.limits_um[0], self.limits_um[1])

    def stop(self) -> None:
        pass

    def set_origin_x(self) -> None:
        raise NotImplementedError("the virtual stage's origin is the slide corner")

    def set_origin_y(self) -> None:
        raise NotImplementedError("the virtual stage's origin is the slide corner")


class VirtualZStage(StageDevice):
    """Focus drive in µm."""

    def __init__(self, limits_um: tuple[float, float], start_um: float, faults: _Faults) -> None:
        super().__init__()
        self.limits_um = limits_um
        self._faults = faults
        self._z = float(start_um)
        self.moves = 0

    def set_position_um(self, val: float) -> None:
        lo, hi = self.limits_um
        if not lo <= val <= hi:
            raise ValueError(f"Z {val:.2f} µm is outside the focus limits {lo}..{hi}")
        self._faults.stage("Z stage")
        self._z = float(val)
        self.moves += 1

    def get_position_um(self) -> float:
        return self._z

    def home(self) -> None:
        self._z = 0.0

    def stop(self) -> None:
        pass

    def set_origin(self) -> None:
        raise NotImplementedError("the virtual focus drive has a fixed origin")


class VirtualLamp(ShutterDevice):
    """Transmitted-light lamp: the camera sees black while it is off."""

    def __init__(self) -> None:
        super().__init__()
        self._open = False

    def get_open(self) -> bool:
        return self._open

    def set_open(self, open: bool) -> None:
        self._open = bool(open)


class VirtualNosepiece(StateDevice):
    """Objective turret: state 0 the 100x counting objective, state 1 the 10x pre-scan one."""

    def __init__(self) -> None:
        super().__init__(dict(enumerate(OBJECTIVES)))
        self._state = 0

    def get_state(self) -> int:
        return self._state

    def set_state(self, position: int) -> None:
        self._state = int(position)

    @property
    def zoom_out(self) -> float:
        """Slide pixels per camera pixel through the objective in place."""
        return list(OBJECTIVES.values())[self._state][0]

    @property
    def blur_factor(self) -> float:
        """Defocus blur of the objective in place, relative to the 100x objective."""
        return list(OBJECTIVES.values())[self._state][1]


class VirtualCamera(SimpleCameraDevice):
    """RGB camera rendering the slide's field of view at the stage position.

    Returns ``(H, W, 3)`` uint8, or with ``packed`` a ``(H, W)`` uint32 32bitRGB image (BGRA
    packed, as real colour cameras deliver through Micro-Manager).
    """

    def __init__(
        self,
        slide: SlideView,
        um_per_px: float,
        xy: VirtualXYStage,
        z: VirtualZStage,
        lamp: VirtualLamp,
        plane: FocalPlane,
        params: VirtualParams,
        faults: _Faults,
        nosepiece: VirtualNosepiece | None = None,
    ) -> None:
        super().__init__()
        self._nosepiece = nosepiece
        self._slide, self._um_per_px = slide, um_per_px
        self._xy, self._z, self._lamp, self._plane = xy, z, lamp, plane
        self._params, self._faults = params, faults
        self._exposure = params.exposure_ms
        self._noise_rng = np.random.default_rng(params.seed + 1)
        self.snaps = 0

    def get_exposure(self) -> float:
        return self._exposure

    def set_exposure(self, exposure: float) -> None:
        self._exposure = float(exposure)

    def sensor_shape(self) -> tuple[int, int] | tuple[int, int, int]:
        h, w = self._params.camera_height, self._params.camera_width
        return (h, w) if self._params.packed_rgb32 else (h, w, 3)

    def dtype(self) -> np.dtype:
        return np.dtype(np.uint32 if self._params.packed_rgb32 else np.uint8)

    def snap(self, buffer: np.ndarray) -> Mapping:
        self._faults.snap()
        rgb = self.render()
        if self._params.packed_rgb32:
            buffer[:] = pack_rgb32(rgb)
        else:
            buffer[:] = rgb
        self.snaps += 1
        return {}

    def render(self) -> np.ndarray:
        """The current field of view as RGB uint8 ``(H, W, 3)``."""
        p = self._params
        h, w = p.camera_height, p.camera_width
        if not self._lamp.get_open():
            return np.zeros((h, w, 3), np.uint8)
        x_um, y_um = self._xy.get_position_um()
        dz = self._z.get_position_um() - self._plane.z_at(x_um, y_um)
        nose = self._nosepiece
        zoom, blur = (nose.zoom_out, nose.blur_factor) if nose is not None else (1.0, 1.0)
        px_um = self._um_per_px * zoom
        sigma_px = p.blur_um_per_um * blur * abs(dz) / px_um
        margin = int(np.ceil(3 * sigma_px)) if sigma_px >= 0.3 else 0
        cx, cy = x_um / px_um, y_um / px_um
        x0, y0 = int(round(cx - w / 2)) - margin, int(round(cy - h / 2)) - margin
        if zoom == 1.0:
            img = self._read_clipped(x0, y0, w + 2 * margin, h + 2 * margin)
        else:
            img = self._read_zoomed_out(x0, y0, w + 2 * margin, h + 2 * margin, zoom)
        if margin:
            img = _gaussian(img, sigma_px)[margin : margin + h, margin : margin + w]
        gain = self._exposure / p.exposure_ms
        if gain != 1.0 or p.noise_sd > 0:
            f = img.astype(np.float32) * gain
            if p.noise_sd > 0:
                f += self._noise_rng.normal(0.0, p.noise_sd, f.shape).astype(np.float32)
            img = np.clip(f, 0, 255).astype(np.uint8)
        return img

    def _read_clipped(self, x0: int, y0: int, w: int, h: int, level: int = 0) -> np.ndarray:
        """Pixels of pyramid ``level`` (0: full resolution) in [x0, x0+w) × [y0, y0+h); glass
        where the window leaves the slide."""
        if level == 0:
            sw, sh = self._slide.width, self._slide.height

            def read(x: int, y: int, rw: int, rh: int) -> np.ndarray:
                return self._slide.read_region(x, y, rw, rh)
        else:
            sw, sh = self._slide.levels[level][:2]

            def read(x: int, y: int, rw: int, rh: int) -> np.ndarray:
                return self._slide.read_level_region(level, x, y, rw, rh)
        ax0, ay0, ax1, ay1 = max(x0, 0), max(y0, 0), min(x0 + w, sw), min(y0 + h, sh)
        if ax0 == x0 and ay0 == y0 and ax1 == x0 + w and ay1 == y0 + h:
            return np.ascontiguousarray(read(x0, y0, w, h))
        out = np.empty((h, w, 3), np.uint8)
        out[:] = GLASS_RGB
        if ax1 > ax0 and ay1 > ay0:
            out[ay0 - y0 : ay1 - y0, ax0 - x0 : ax1 - x0] = read(ax0, ay0, ax1 - ax0, ay1 - ay0)
        return out

    def _read_zoomed_out(self, x0: int, y0: int, w: int, h: int, zoom: float) -> np.ndarray:
        """``w × h`` camera pixels each spanning ``zoom`` slide pixels, top-left ``(x0, y0)``
        in camera pixels: read from the coarsest pyramid level still as fine, then shrunk.
        A slide without a pyramid (no ``levels``) is read at full resolution."""
        levels = getattr(self._slide, "levels", ((self._slide.width, self._slide.height, 1.0),))
        level = max((i for i, lv in enumerate(levels) if lv[2] <= zoom * 1.001), default=0)
        f = zoom / levels[level][2]  # level pixels per camera pixel
        region = self._read_clipped(int(round(x0 * f)), int(round(y0 * f)),
                                    max(1, int(round(w * f))), max(1, int(round(h * f))), level)
        return cv2.resize(region, (w, h), interpolation=cv2.INTER_AREA)


def _gaussian(img: np.ndarray, sigma_px: float) -> np.ndarray:
    # Large blurs are done at reduced size (an integer factor, cv2's fast area path): the same
    # look at a bounded cost per snap.
    if sigma_px <= 6:
        return cv2.GaussianBlur(img, (0, 0), sigma_px, borderType=cv2.BORDER_REFLECT)
    f = int(sigma_px // 3)
    h, w = img.shape[:2]
    small = cv2.resize(img, (max(1, w // f), max(1, h // f)), interpolation=cv2.INTER_AREA)
    small = cv2.GaussianBlur(small, (0, 0), sigma_px / f, borderType=cv2.BORDER_REFLECT)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def pack_rgb32(rgb: np.ndarray) -> np.ndarray:
    """RGB uint8 ``(H, W, 3)`` → 32bitRGB uint32 ``(H, W)``: bytes B, G, R, A in memory order."""
    h, w = rgb.shape[:2]
    bgra = np.empty((h, w, 4), np.uint8)
    bgra[..., 0], bgra[..., 1], bgra[..., 2], bgra[..., 3] = rgb[..., 2], rgb[..., 1], rgb[..., 0], 255
    return bgra.view(np.uint32).reshape(h, w)


@dataclass
class VirtualMicroscope:
    """A loaded UniMMCore with the virtual devices, and handles on them for tests/benches."""

    core: UniMMCore
    camera: VirtualCamera
    xy: VirtualXYStage
    z: VirtualZStage
    lamp: VirtualLamp
    nosepiece: VirtualNosepiece
    plane: FocalPlane
    faults: _Faults
    um_per_px: float

    def sync_pixel_size(self) -> None:
        """Set the core's pixel size for the objective in place (a real system's pixel-size
        configs follow the turret by themselves; a Python device's cannot)."""
        self.core.setPixelSizeUm(PIXEL_CONFIG, self.um_per_px * self.nosepiece.zoom_out)

    @property
    def stage_limits_um(self) -> tuple[float, float, float, float]:
        return self.xy.limits_um


def build_virtual_microscope(
    slide: SlideView, um_per_px: float, params: VirtualParams
) -> VirtualMicroscope:
    """Load the virtual devices into a fresh UniMMCore, ready for the driver.

    The stage starts at the slide centre, Z at the focal plane there plus 3 µm (the user's
    rough focus), the lamp on, the pixel size config active.
    """
    import tempfile

    if not um_per_px > 0:
        raise ValueError(f"um_per_px must be positive, got {um_per_px}")
    limits = (0.0, 0.0, slide.width * um_per_px, slide.height * um_per_px)
    faults = _Faults(params.snap_failure_rate, params.stage_timeout_rate, params.seed)
    plane = FocalPlane(params.focus_z_um, params.tilt_x_um_per_mm, params.tilt_y_um_per_mm)
    xy = VirtualXYStage(limits, faults)
    start_z = plane.z_at(*xy.get_position_um()) + 3.0
    z = VirtualZStage(params.z_limits_um, start_z, faults)
    lamp = VirtualLamp()
    nosepiece = VirtualNosepiece()
    camera = VirtualCamera(slide, um_per_px, xy, z, lamp, plane, params, faults, nosepiece)
    # Any folder silences UniMMCore's "no Micro-Manager installation" lookup.
    core = UniMMCore(mm_path=tempfile.gettempdir())
    devices = ((XY_STAGE, xy), (Z_STAGE, z), (LAMP, lamp), (NOSEPIECE, nosepiece), (CAMERA, camera))
    for label, dev in devices:
        core.loadPyDevice(label, dev)
    core.initializeAllDevices()
    for objective in OBJECTIVES:
        core.defineConfig(OBJECTIVE_GROUP, objective, NOSEPIECE, "Label", objective)
    core.setCameraDevice(CAMERA)
    core.setXYStageDevice(XY_STAGE)
    core.setFocusDevice(Z_STAGE)
    core.setShutterDevice(LAMP)
    # UniMMCore 0.18 does not operate a Python shutter on auto-shutter snaps; bright-field
    # needs no light protection, so the lamp simply stays on.
    core.setAutoShutter(False)
    core.setShutterOpen(True)
    # A pixel-size config with no settings always applies (a Python device's property can't
    # be a setting of the C++ core's config).
    core.definePixelSizeConfig(PIXEL_CONFIG)
    core.setPixelSizeUm(PIXEL_CONFIG, um_per_px)
    core.setPixelSizeConfig(PIXEL_CONFIG)
    return VirtualMicroscope(core, camera, xy, z, lamp, nosepiece, plane, faults, um_per_px)
