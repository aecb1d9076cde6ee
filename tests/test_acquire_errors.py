"""Bad input gets one clear error before any stage moves."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.acquisition import AcquisitionError
from drivers.micromanager import open_microscope
from drivers.virtual import VirtualLamp
from pipeline.errors import ImageError
from tests.acquire_fixtures import CfgCamera, acquisition_params, bccd_slide, write_cfg


def test_missing_config_file(tmp_path):
    with pytest.raises(AcquisitionError, match="no such Micro-Manager config"):
        open_microscope(acquisition_params(), mm_config=tmp_path / "scope.cfg")


def test_unreadable_config_file(tmp_path):
    bad = tmp_path / "scope.cfg"
    bad.write_bytes(b"\xff\xfe\x00garbage\x81")
    with pytest.raises(AcquisitionError, match="unreadable Micro-Manager config"):
        open_microscope(acquisition_params(), mm_config=bad)
    empty = tmp_path / "empty.cfg"
    empty.write_text("# nothing here\n")
    with pytest.raises(AcquisitionError, match="empty"):
        open_microscope(acquisition_params(), mm_config=empty)


def test_config_whose_device_cannot_load(tmp_path):
    cfg = tmp_path / "demo.cfg"
    cfg.write_text("Device,Camera,DemoCamera,DCam\nProperty,Core,Initialize,1\n")
    # The config line and its cause (the adapter library is not there), with where to look.
    with pytest.raises(AcquisitionError, match=r"cannot load the Micro-Manager config: Line 1: "
                       r"Device,Camera,DemoCamera,DCam; Failed to load device adapter "
                       r"\"DemoCamera\".*is Micro-Manager installed"):
        open_microscope(acquisition_params(), mm_config=cfg)


class GreyCamera(CfgCamera):
    """The test rig's camera delivering grey frames, loaded by the .cfg below."""

    def sensor_shape(self):
        return super().sensor_shape()[:2]

    def snap(self, buffer):
        buffer[:] = self.render().mean(axis=2).astype(np.uint8)
        return {}


def test_a_monochrome_camera_is_refused_before_the_stage_moves(tmp_path):
    cfg = write_cfg(tmp_path / "grey.cfg")
    cfg.write_text(cfg.read_text().replace("tests.acquire_fixtures,CfgCamera",
                                           f"{__name__},GreyCamera"))
    with pytest.raises(AcquisitionError, match="'Cam' is monochrome"):
        open_microscope(acquisition_params(), mm_config=cfg, um_per_px=0.072)


def test_config_without_camera_or_xy_stage(tmp_path):
    with pytest.raises(AcquisitionError, match="names no camera"):
        open_microscope(acquisition_params(), mm_config=write_cfg(tmp_path / "a.cfg", camera=False))
    with pytest.raises(AcquisitionError, match="names no XY stage"):
        open_microscope(acquisition_params(), mm_config=write_cfg(tmp_path / "b.cfg", xy=False))


def test_config_without_pixel_size_needs_um_per_px(tmp_path):
    cfg = write_cfg(tmp_path / "scope.cfg")
    with pytest.raises(AcquisitionError, match="no pixel size"):
        open_microscope(acquisition_params(), mm_config=cfg)
    scope = open_microscope(acquisition_params(), mm_config=cfg, um_per_px=0.072)
    try:
        # the complete config is a working microscope: no shutter, so auto-shutter is off
        assert not scope.core.getAutoShutter()
        assert scope.snap_rgb().shape == (480, 320, 3)
    finally:
        scope.close()


def test_area_outside_stage_limits_on_real_hardware(tmp_path):
    params = acquisition_params(stage_limits_um=[0, 0, 40, 30])
    scope = open_microscope(params, mm_config=write_cfg(tmp_path / "s.cfg"), um_per_px=0.072)
    try:
        with pytest.raises(AcquisitionError, match="outside the stage limits"):
            scope.plan(((0, 0), (100, 100)))
        assert scope.xy_moves == 0
    finally:
        scope.close()


def test_missing_slide_file(tmp_path):
    with pytest.raises(ImageError, match="missing.tif"):
        open_microscope(acquisition_params(), virtual_slide=tmp_path / "missing.tif")


def test_area_outside_the_virtual_slide(tmp_path):
    scope = open_microscope(
        acquisition_params(), virtual_slide=bccd_slide(tmp_path, 2, 2), um_per_px=0.072
    )
    try:
        with pytest.raises(AcquisitionError, match="outside the stage limits"):
            scope.plan(((0, 0), (500, 500)))
        assert scope.virtual.xy.moves == 0 and scope.virtual.camera.snaps == 0
    finally:
        scope.close()


@pytest.mark.parametrize("target", [0, -5])
def test_target_must_be_positive(target):
    from drivers.acquisition import count_slide

    with pytest.raises(AcquisitionError, match="target must be a positive"):
        count_slide(_NeverCalled(), lambda rgb, px: [], target)


class _NeverCalled:
    def fields(self, start_index: int = 0):
        raise AssertionError("no field may be acquired for a bad target")


def test_exactly_one_microscope(tmp_path):
    with pytest.raises(AcquisitionError, match="exactly one"):
        open_microscope(acquisition_params())
    with pytest.raises(AcquisitionError, match="positive"):
        open_microscope(acquisition_params(), virtual_slide=tmp_path / "x.tif", um_per_px=-1)


class ShutterCamera(CfgCamera):
    """The test rig's camera behind the Python shutter the .cfg below loads."""

    def render(self):
        self._lamp = SHUTTER[0]
        return super().render()


class Shutter(VirtualLamp):
    def __init__(self) -> None:
        super().__init__()
        SHUTTER[:] = [self]


SHUTTER: list = []


def test_a_python_shutter_is_opened(tmp_path):
    """UniMMCore's auto-shutter does not open a Python shutter around a snap: every frame was
    black, and the slide ended as "thin" everywhere with 0 cells."""
    cfg = write_cfg(tmp_path / "lamp.cfg")
    text = cfg.read_text().replace("tests.acquire_fixtures,CfgCamera", f"{__name__},ShutterCamera")
    lines = text.splitlines()
    lines.insert(0, f"#py pyDevice,Lamp,{__name__},Shutter")
    lines.append("#py Property,Core,Shutter,Lamp")
    cfg.write_text("\n".join(lines) + "\n")
    scope = open_microscope(acquisition_params(), mm_config=cfg, um_per_px=0.072)
    try:
        assert scope.core.getShutterDevice() == "Lamp" and scope.core.getShutterOpen()
        assert scope.snap_rgb().mean() > 100  # a lit smear, not a black frame
    finally:
        scope.close()
