"""The Micro-Manager acquisition driver: one class over any pymmcore-plus core.

``Microscope`` wraps a ``CMMCorePlus`` loaded from a lab's ``.cfg`` (real hardware) or a
``UniMMCore`` with the virtual microscope's Python devices; nothing above it knows which.
``MicroscopeFieldSource`` turns a field plan into a pymmcore-plus MDA run and yields the
fields as they arrive (the ``FieldSource`` protocol of ``drivers.acquisition``).

pymmcore-plus 0.18 pitfalls handled here:

- with no shutter device the MDA fails at the first frame: auto-shutter is switched off;
- UniMMCore's auto-shutter never opens a Python shutter (every frame black): it is opened
  and left open;
- a snap error during an MDA is only logged as a warning and the frame silently missing:
  our engine snaps itself, retries with back-off, fails the slide after ``retries``, and
  every frame is counted by its field index (a frame is never handed on twice, a missing
  one fails the slide);
- colour cameras deliver 32bitRGB (BGRA packed in uint32): ``rgb_from_camera`` unpacks it;
- a useq grid iterated before the run freezes its field size: the plan is made of absolute
  positions computed with the camera's real field of view (``drivers.plan``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import useq
from pymmcore_plus import CMMCorePlus
from pymmcore_plus.mda import MDAEngine
from pymmcore_plus.mda._engine import ImagePayload

from drivers.acquisition import AcquisitionError, AcquisitionParams, FieldResult, PrescanParams
from drivers.autofocus import find_focus
from drivers.plan import Area, FieldPlan, plan_fields
from drivers.virtual import SlideView, VirtualMicroscope, build_virtual_microscope
from pipeline.detect import DetectParams
from pipeline.quality import assess_field

log = logging.getLogger(__name__)
T = TypeVar("T")


def _not_our_cancel(record: logging.LogRecord) -> bool:
    # Every slide that reaches its target cancels its MDA: pymmcore-plus warns of it with the
    # whole position list, a screenful each time, for nothing that went wrong.
    return not record.getMessage().startswith("MDA Canceled")


logging.getLogger("pymmcore-plus").addFilter(_not_our_cancel)
#: How far from the requested position (a fraction of the field of view) a stage may stop.
XY_TOLERANCE_FOV = 0.05


def rgb_from_camera(img: np.ndarray, bit_depth: int = 16) -> np.ndarray:
    """A camera frame as RGB uint8 ``(H, W, 3)``.

    Accepts a 3-channel RGB frame (Python cameras, or ``getImage(fix=True)`` output), a 2-D
    uint32 32bitRGB frame (BGRA bytes packed per pixel, as real colour cameras deliver) or an
    ``(H, W, 4)`` BGRA frame. 16-bit colour is scaled to 8 bits from the camera's
    ``bit_depth`` (a 12-bit camera's 4095 is white; shifting by 8 made it 15, every field
    black and "out of focus"). Refuses a monochrome camera.
    """
    if img.ndim == 2 and img.dtype == np.uint32:
        bgra = img.view(np.uint8).reshape(*img.shape, 4)
        return np.ascontiguousarray(bgra[..., [2, 1, 0]])
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[..., [2, 1, 0]]
    if img.ndim == 3 and img.shape[2] == 3:
        if img.dtype == np.uint16:
            top = (1 << min(max(int(bit_depth), 9), 16)) - 1
            img = (np.minimum(img, top).astype(np.float32) * (255.0 / top) + 0.5).astype(np.uint8)
        if img.dtype == np.uint8:
            return np.ascontiguousarray(img)
    raise AcquisitionError(
        f"the camera delivers {img.dtype} frames of shape {img.shape}: a colour (RGB) camera "
        "is required (monochrome cameras cannot show the stain)"
    )


def release_core(core: CMMCorePlus) -> None:
    """Unload a core's devices and detach its callback relay.

    An unloaded core left alive until interpreter exit can abort the process there ("FATAL:
    exception not rethrown") through its C++ -> Python callback relay; it is dropped here, as
    ``CMMCorePlus.__del__`` would.
    """
    try:
        core.unloadAllDevices()
    except Exception as exc:  # releasing must not hide the result of a run
        log.warning("unloading devices failed: %s", exc)
    with contextlib.suppress(Exception):
        super(CMMCorePlus, core).registerCallback(None)


class Microscope:
    """A camera, an XY stage and a focus drive behind a pymmcore-plus core.

    Moves and snaps are retried with exponential back-off (``params.retries``,
    ``params.backoff_s``); after the last retry an AcquisitionError names the fault.
    """

    def __init__(
        self,
        core: CMMCorePlus,
        params: AcquisitionParams,
        *,
        um_per_px: float | None = None,
        stage_limits_um: tuple[float, float, float, float] | None = None,
        virtual: VirtualMicroscope | None = None,
    ) -> None:
        self.core, self.params, self.virtual = core, params, virtual
        self.stage_limits_um = stage_limits_um
        try:
            self.um_per_px = self._check(core, um_per_px)
        except AcquisitionError:
            release_core(core)
            raise
        self.z_moves = 0
        self.xy_moves = 0
        self._slide: object | None = None

    @staticmethod
    def _check(core: CMMCorePlus, um_per_px: float | None) -> float:
        if not core.getCameraDevice():
            raise AcquisitionError("the Micro-Manager config names no camera")
        if not core.getXYStageDevice():
            raise AcquisitionError("the Micro-Manager config names no XY stage")
        # One component of 1 or 2 bytes is grey; 4 bytes is 32bitRGB packed in one word.
        if core.getNumberOfComponents() == 1 and core.getBytesPerPixel() in (1, 2):
            raise AcquisitionError(
                f"camera {core.getCameraDevice()!r} is monochrome: a colour (RGB) camera is "
                "required (a monochrome camera cannot show the stain)")
        shutter = core.getShutterDevice()
        if not shutter:
            core.setAutoShutter(False)  # else the MDA fails at its first frame
        elif getattr(core, "isPyDevice", lambda _label: False)(shutter):
            # UniMMCore does not open a Python shutter around a snap (auto-shutter on, every
            # frame black): the lamp stays open while the slide is counted.
            core.setAutoShutter(False)
            core.setShutterOpen(True)
        px = float(um_per_px) if um_per_px else float(core.getPixelSizeUm())
        if not px > 0:
            raise AcquisitionError(
                "the Micro-Manager config defines no pixel size for the current objective: "
                "add a pixel size config or give --um-per-px"
            )
        return px

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_mm_config(
        cls, path: str | Path, params: AcquisitionParams, um_per_px: float | None = None
    ) -> Microscope:
        """Load a lab's Micro-Manager ``.cfg``; clear errors for a missing, unreadable or
        incomplete config. Lines starting ``#py `` load Python devices (UniMMCore)."""
        p = Path(path)
        if not p.is_file():
            raise AcquisitionError(f"{p}: no such Micro-Manager config file")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AcquisitionError(f"{p}: unreadable Micro-Manager config ({exc})") from None
        if not any(line.strip() and not line.startswith("#") for line in text.splitlines()) and (
            "#py " not in text
        ):
            raise AcquisitionError(f"{p}: the Micro-Manager config is empty")
        if "#py " in text:
            from pymmcore_plus.experimental.unicore import UniMMCore

            core: CMMCorePlus = UniMMCore()
        else:
            core = CMMCorePlus()
        try:
            core.loadSystemConfiguration(str(p.resolve()))
        except Exception as exc:  # pymmcore raises OSError/RuntimeError with multi-line text
            release_core(core)
            # Every line: the first names the config line, the ones after it the cause
            # (an adapter library that is not installed, a port that does not open).
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            why = "; ".join(lines) or type(exc).__name__
            hint = ("" if "adapter" not in why.lower() else
                    " (is Micro-Manager installed with this device adapter? pymmcore-plus "
                    "looks in its MICROMANAGER_PATH or `mmcore install` folder)")
            raise AcquisitionError(
                f"{p}: cannot load the Micro-Manager config: {why}{hint}") from None
        pre = params.prescan
        if (pre.enabled and core.isGroupDefined(pre.config_group)
                and core.isConfigDefined(pre.config_group, pre.counting_objective)):
            # A run cut short during a pre-scan leaves the turret on the pre-scan objective,
            # and the pixel size read next would be that objective's.
            try:
                core.setConfig(pre.config_group, pre.counting_objective)
                core.waitForConfig(pre.config_group, pre.counting_objective)
            except Exception as exc:
                release_core(core)
                raise AcquisitionError(
                    f"{p}: cannot select the counting objective {pre.counting_objective!r}: "
                    f"{exc}") from None
        return cls(core, params, um_per_px=um_per_px)

    @classmethod
    def from_virtual_slide(
        cls, slide: SlideView, um_per_px: float, params: AcquisitionParams
    ) -> Microscope:
        """The virtual microscope over ``slide`` (a SlideImage or any SlideView)."""
        vm = build_virtual_microscope(slide, um_per_px, params.virtual)
        scope = cls(vm.core, params, stage_limits_um=vm.stage_limits_um, virtual=vm)
        scope._slide = slide
        return scope

    # -- geometry ------------------------------------------------------------------------

    @property
    def fov_um(self) -> tuple[float, float]:
        """Field of view (width, height) in µm at the current ROI and pixel size."""
        w, h = self.camera_size
        return w * self.um_per_px, h * self.um_per_px

    @property
    def z_limits_um(self) -> tuple[float, float] | None:
        return self.virtual.z.limits_um if self.virtual is not None else None

    @property
    def camera_size(self) -> tuple[int, int]:
        """The camera image (width, height) in pixels at the current ROI."""
        *_, w, h = self.core.getROI()
        return int(w), int(h)

    def plan(self, area: Area | None, detect: DetectParams | None = None) -> FieldPlan:
        """Fields covering ``area`` (stage µm; None = the whole stage range), checked against
        the stage limits before anything moves; with ``params.prescan`` enabled, only those
        the low-magnification pre-scan (drivers/prescan.py, using ``detect``) finds fit."""
        if area is None:
            if self.stage_limits_um is None:
                raise AcquisitionError(
                    "no counting area: give acquisition.area_um (or --area) in stage µm"
                )
            x0, y0, x1, y1 = self.stage_limits_um
            area = ((x0, y0), (x1, y1))
        plan = plan_fields(area, *self.fov_um, stage_limits_um=self.stage_limits_um)
        if not self.params.prescan.enabled:
            return plan
        if detect is None:
            raise ValueError("the pre-scan needs the detector's parameters")
        from drivers.prescan import prescan

        return prescan(self, plan, self.params.prescan, self.params.quality, detect)

    # -- objectives (pre-scan) -----------------------------------------------------------

    def check_objectives(self, params: PrescanParams) -> None:
        """AcquisitionError unless the config group and both its presets are defined."""
        group = params.config_group
        if not self.core.isGroupDefined(group):
            raise AcquisitionError(
                f"the pre-scan needs a Micro-Manager config group {group!r} that switches "
                "objectives; the config has none"
            )
        for preset in (params.objective, params.counting_objective):
            if not self.core.isConfigDefined(group, preset):
                raise AcquisitionError(
                    f"config group {group!r} has no preset {preset!r} "
                    f"(it has {', '.join(self.core.getAvailableConfigs(group)) or 'none'})"
                )

    def pixel_size_now(self) -> float:
        """The core's pixel size (µm/px) for the objective in place; 0 when it defines none."""
        if self.virtual is not None:
            self.virtual.sync_pixel_size()
        return float(self.core.getPixelSizeUm())

    def use_objective(self, params: PrescanParams, counting: bool = False) -> float:
        """Switch to the pre-scan (or counting) objective; return its pixel size (µm/px)."""
        group = params.config_group
        preset = params.counting_objective if counting else params.objective

        def switch() -> None:
            self.core.setConfig(group, preset)
            self.core.waitForConfig(group, preset)

        self._retry(f"objective change to {preset!r}", switch)
        px = self.pixel_size_now()
        if not px > 0:
            raise AcquisitionError(
                f"the Micro-Manager config defines no pixel size for objective preset {preset!r}"
            )
        return px

    # -- hardware with retries -----------------------------------------------------------

    def _retry(self, what: str, action: Callable[[], T]) -> T:
        delay = self.params.backoff_s
        for attempt in range(self.params.retries + 1):
            try:
                return action()
            except AcquisitionError:
                raise
            except Exception as exc:  # device adapters raise RuntimeError/OSError/ValueError
                if attempt == self.params.retries:
                    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                    raise AcquisitionError(
                        f"{what} failed {attempt + 1} times: {reason}"
                    ) from None
                log.warning("%s failed (%s); retry %d in %.2f s", what, exc, attempt + 1, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def move_xy(self, x: float, y: float) -> None:
        """Move and read the position back: a stage stopped at its travel limit (or by a
        dropped command) reports success and would show one place as many fields."""
        tol = XY_TOLERANCE_FOV * min(self.fov_um)

        def move() -> None:
            self.core.setXYPosition(x, y)
            self.core.waitForDevice(self.core.getXYStageDevice())
            at_x, at_y = self.core.getXYPosition()
            if abs(at_x - x) > tol or abs(at_y - y) > tol:
                raise RuntimeError(f"the stage is at ({at_x:.1f}, {at_y:.1f}) µm after the "
                                   "move (a travel limit, or the stage did not move)")

        self._retry(f"XY stage move to ({x:.1f}, {y:.1f}) µm", move)
        self.xy_moves += 1

    def move_z(self, z: float) -> None:
        def move() -> None:
            self.core.setZPosition(z)
            self.core.waitForDevice(self.core.getFocusDevice())

        self._retry(f"focus move to {z:.2f} µm", move)
        self.z_moves += 1

    def get_z(self) -> float | None:
        return float(self.core.getZPosition()) if self.core.getFocusDevice() else None

    def snap_rgb(self) -> np.ndarray:
        """Snap one frame (with retries) and return it as RGB uint8 ``(H, W, 3)``."""

        def snap() -> np.ndarray:
            self.core.snapImage()
            return self.core.getImage(fix=True)

        return rgb_from_camera(self._retry("camera snap", snap), self.core.getImageBitDepth())

    def focus(self, z0: float | None) -> tuple[float | None, bool]:
        """Focus the current field; returns (z, found). Hardware autofocus when the config
        names a device and ``use_hardware``; else the software search from ``z0``."""
        af = self.params.autofocus
        if not self.core.getFocusDevice() or not af.enabled:
            return self.get_z(), False
        if af.use_hardware and self.core.getAutoFocusDevice():
            try:
                self._retry("hardware autofocus", self.core.fullFocus)
                return self.get_z(), True
            except AcquisitionError as exc:
                # A field the device cannot lock on (a gap in the smear, a bubble) is no
                # reason to fail the slide: the image-based search decides this field.
                log.warning("%s; searching by image instead", exc)
        start = self.get_z() if z0 is None else z0
        if start is None:
            return None, False
        if abs(start - (self.get_z() or 0.0)) > 1e-6:
            self.move_z(start)
        result = find_focus(
            self.move_z, self.snap_rgb, start, self.um_per_px, af, self.z_limits_um
        )
        return result.z, result.found

    def close(self) -> None:
        """Release the devices (and the virtual slide). The core is unusable afterwards."""
        release_core(self.core)
        close_slide = getattr(self._slide, "close", None)
        if close_slide is not None:
            close_slide()


class _FieldEngine(MDAEngine):
    """MDA engine for counting: per position, move (with retries), focus, snap (with retries).

    The base engine only warns when a move or snap fails and drops the frame; here a fault is
    retried and, after the last retry, raised so the run stops with the reason.
    """

    def __init__(self, scope: Microscope, source: MicroscopeFieldSource) -> None:
        super().__init__(scope.core, restore_initial_state=False, use_hardware_sequencing=False)
        self.scope, self.source = scope, source

    def setup_single_event(self, event: useq.MDAEvent) -> None:
        if event.x_pos is not None and event.y_pos is not None:
            self.scope.move_xy(event.x_pos, event.y_pos)
        x, y = event.x_pos or 0.0, event.y_pos or 0.0
        z, found = self.scope.focus(self.source.focus_start(x, y))
        if found and z is not None:
            self.source.remember_focus(x, y, z)
        event.metadata["stage_z"] = z

    def exec_single_event(self, event: useq.MDAEvent) -> Iterator[ImagePayload]:
        rgb = self.scope.snap_rgb()
        meta: Any = {"stage_z": event.metadata.get("stage_z")}
        yield ImagePayload(rgb, event, meta)


_DONE = object()


class MicroscopeFieldSource:
    """Acquire a plan's fields through an MDA, in order, gated for quality.

    Fields are acquired on the MDA runner thread ahead of analysis (at most
    ``params.prefetch_fields`` waiting); closing the ``fields()`` iterator cancels the MDA.
    """

    def __init__(
        self,
        scope: Microscope,
        plan: FieldPlan,
        params: AcquisitionParams,
        detect_params: DetectParams,
    ) -> None:
        self.scope, self.plan, self.params, self.detect_params = scope, plan, params, detect_params
        self._focus: list[tuple[float, float, float]] = []
        self.frames_acquired = 0

    # Focus memory: a field starts its search where the smear's focal plane, fitted through
    # the fields focused so far, predicts it (a smear is a tilted plane to first order). The
    # fit is centred on those fields, so a direction they don't span (the first row) adds no
    # tilt; with one field focused, its focus.
    def focus_start(self, x: float, y: float) -> float | None:
        if not self._focus:
            return None
        pts = np.array(self._focus[-16:])
        centre = pts.mean(axis=0)
        if len(pts) == 1:
            return float(centre[2])
        a = pts[:, :2] - centre[:2]
        tilt = np.linalg.lstsq(a, pts[:, 2] - centre[2], rcond=None)[0]
        return float(centre[2] + tilt @ (np.array([x, y]) - centre[:2]))

    def remember_focus(self, x: float, y: float, z: float) -> None:
        self._focus.append((x, y, z))
        del self._focus[:-64]

    def fields(self, start_index: int = 0) -> Iterator[FieldResult]:
        positions = self.plan.positions[start_index : self.params.max_fields]
        if not positions:
            return
        seq = useq.MDASequence(
            stage_positions=[
                useq.AbsolutePosition(x=x, y=y, name=str(start_index + i))
                for i, (x, y) in enumerate(positions)
            ]
        )
        out: queue.Queue[Any] = queue.Queue(maxsize=self.params.prefetch_fields)
        closing = threading.Event()
        errors: list[BaseException] = []
        seen: set[int] = set()

        def put(item: Any) -> None:
            while not closing.is_set():
                try:
                    out.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        core = self.scope.core

        # Connected to the signal itself, so it runs on the MDA thread between events: a full
        # queue holds the stage (an ``output=`` handler runs on a relay thread of its own
        # with an unbounded queue: the stage toured the whole plan before a field was
        # counted, and a handler's error was only logged while the field went missing).
        def on_frame(img: np.ndarray, event: useq.MDAEvent, meta: Any) -> None:
            index = int(event.pos_name or -1)
            if index in seen or closing.is_set() or errors:  # never hand a field on twice
                return
            try:
                item = self._field(index, img, event, meta)
            except BaseException as exc:  # the runner would only log it
                errors.append(exc)
                core.mda.cancel()
                return
            seen.add(index)
            self.frames_acquired += 1
            put(item)

        def run() -> None:
            core.mda.set_engine(_FieldEngine(self.scope, self))
            core.mda.events.frameReady.connect(on_frame)
            try:
                core.mda.run(seq)
            except BaseException as exc:
                errors.append(exc)
            finally:
                core.mda.events.frameReady.disconnect(on_frame)
                put(_DONE)

        thread = threading.Thread(target=run, name="marrowcount-mda", daemon=True)
        thread.start()
        finished = False
        try:
            while True:
                item = out.get()
                if item is _DONE:
                    break
                yield item
            finished = True
        finally:
            # Cancel first, so the runner stops at the event boundary, then release a frame
            # handler blocked on the full queue (its frame is dropped, never handed on).
            self.scope.core.mda.cancel()
            closing.set()
            thread.join(timeout=60)
        if finished:
            if errors:
                exc = errors[0]
                if isinstance(exc, AcquisitionError):
                    raise exc
                raise AcquisitionError(f"acquisition failed: {type(exc).__name__}: {exc}") from exc
            missing = sorted(set(range(start_index, start_index + len(positions))) - seen)
            if missing:
                raise AcquisitionError(
                    f"{len(missing)} field(s) never acquired (first: field {missing[0]})"
                )

    def _field(
        self, index: int, img: np.ndarray, event: useq.MDAEvent, meta: Any
    ) -> FieldResult:
        rgb = rgb_from_camera(img)
        q = assess_field(rgb, self.scope.um_per_px, self.params.quality, self.detect_params)
        return FieldResult(
            index=index,
            stage_x=float(event.x_pos or 0.0),
            stage_y=float(event.y_pos or 0.0),
            stage_z=meta.get("stage_z"),
            tile=None,
            um_per_px=self.scope.um_per_px,
            image=rgb,
            quality=q.as_dict(),
            skipped_reason=q.reason,
        )


def open_microscope(
    params: AcquisitionParams,
    *,
    mm_config: str | Path | None = None,
    virtual_slide: str | Path | None = None,
    um_per_px: float | None = None,
) -> Microscope:
    """The microscope to count with: real hardware from ``mm_config`` or the virtual
    microscope over ``virtual_slide`` (read lazily). Every check that can fail does so here,
    before any stage moves. ``um_per_px`` overrides the config's / slide's pixel size."""
    if (mm_config is None) == (virtual_slide is None):
        raise AcquisitionError("give exactly one of a Micro-Manager config or a virtual slide")
    if um_per_px is not None and not um_per_px > 0:
        raise AcquisitionError(f"--um-per-px must be a positive number, got {um_per_px}")
    if mm_config is not None:
        scope = Microscope.from_mm_config(mm_config, params, um_per_px)
        if params.stage_limits_um is not None:
            scope.stage_limits_um = params.stage_limits_um
        return scope
    from drivers.slide_image import open_slide

    slide = open_slide(virtual_slide)  # ImageError with the reason for a missing/broken file
    px = um_per_px or slide.um_per_px
    if not px:
        slide.close()
        raise AcquisitionError(
            f"{virtual_slide}: the slide file states no pixel size; give --um-per-px"
        )
    return Microscope.from_virtual_slide(slide, float(px), params)
