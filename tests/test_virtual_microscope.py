"""The virtual microscope: real pymmcore-plus UniMMCore devices rendering a real slide."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.acquisition import AcquisitionError
from drivers.micromanager import rgb_from_camera
from drivers.virtual import pack_rgb32
from pipeline.quality import sharpness
from tests.acquire_fixtures import bccd_slide, virtual_scope
from tests.conftest import BCCD_UM_PER_PX
from tests.slide_fixtures import bccd_mosaic


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return bccd_slide(tmp_path_factory.mktemp("virtual"), 3, 2)


def test_camera_renders_the_field_at_the_stage_position(slide):
    scope = virtual_scope(slide, virtual={"tilt_x_um_per_mm": 0.0, "tilt_y_um_per_mm": 0.0})
    truth = bccd_mosaic(3, 2)
    assert scope.um_per_px == pytest.approx(BCCD_UM_PER_PX)
    assert scope.fov_um == pytest.approx((640 * BCCD_UM_PER_PX, 480 * BCCD_UM_PER_PX))
    # Field centred on the second BCCD field of the first row, in focus.
    x, y = (640 + 320) * BCCD_UM_PER_PX, 240 * BCCD_UM_PER_PX
    scope.move_xy(x, y)
    scope.move_z(scope.virtual.plane.z_at(x, y))
    rgb = scope.snap_rgb()
    assert rgb.shape == (480, 640, 3) and rgb.dtype == np.uint8
    # The slide is stored JPEG-compressed: equal up to compression error.
    diff = np.abs(rgb.astype(int) - truth[:480, 640:1280].astype(int))
    assert diff.mean() < 3
    # Off the slide edge the camera sees glass, not garbage.
    scope.move_xy(0.0, 0.0)
    corner = scope.snap_rgb()
    assert corner[:200, :300].min() > 200  # the quadrant off the slide is bright glass
    scope.close()


def test_defocus_blurs_in_proportion_to_distance_from_the_tilted_plane(slide):
    scope = virtual_scope(slide, virtual={"tilt_x_um_per_mm": 20.0, "tilt_y_um_per_mm": -10.0})
    x, y = 60.0, 30.0
    z_true = scope.virtual.plane.z_at(x, y)
    assert z_true == pytest.approx(20.0 * 0.06 - 10.0 * 0.03)
    scope.move_xy(x, y)
    values = []
    for dz in (0.0, 0.5, 1.0, 2.0, 4.0):
        scope.move_z(z_true + dz)
        values.append(sharpness(scope.snap_rgb(), scope.um_per_px, 0.15))
    assert all(a > b for a, b in zip(values, values[1:])), values
    # Symmetric about the plane.
    scope.move_z(z_true - 1.0)
    below = sharpness(scope.snap_rgb(), scope.um_per_px, 0.15)
    assert below == pytest.approx(values[2], rel=0.05)
    scope.close()


def test_exposure_and_noise_change_the_image(slide):
    scope = virtual_scope(slide, virtual={"noise_sd": 4.0})
    a, b = scope.snap_rgb(), scope.snap_rgb()
    assert 1 < np.abs(a.astype(int) - b.astype(int)).mean() < 8  # fresh noise each snap
    scope.core.setExposure(scope.params.virtual.exposure_ms / 2)
    dim = scope.snap_rgb()
    assert dim.mean() == pytest.approx(a.mean() / 2, rel=0.1)
    scope.virtual.lamp.set_open(False)
    assert scope.snap_rgb().max() == 0  # lamp off: dark frame
    scope.close()


def test_packed_32bit_rgb_camera_gives_the_right_channel_order(slide):
    """Real colour cameras deliver 32bitRGB: BGRA bytes packed in one uint32 per pixel."""
    bgra = np.array([[[50, 100, 200, 255], [1, 2, 3, 255]]], np.uint8)  # B, G, R, A
    packed = bgra.view(np.uint32).reshape(1, 2)
    assert rgb_from_camera(packed).tolist() == [[[200, 100, 50], [3, 2, 1]]]
    assert rgb_from_camera(bgra).tolist() == [[[200, 100, 50], [3, 2, 1]]]
    # Through the whole driver: a packed camera and an RGB camera see the same field.
    plain = virtual_scope(slide)
    packed_scope = virtual_scope(slide, virtual={"packed_rgb32": True})
    raw = (packed_scope.core.snapImage(), packed_scope.core.getImage())[1]
    assert raw.dtype == np.uint32 and raw.ndim == 2
    rgb = packed_scope.snap_rgb()
    assert np.array_equal(rgb, plain.snap_rgb())
    assert np.array_equal(pack_rgb32(rgb), raw)
    # Stain colour survives: nuclei are blue-purple (B > R) somewhere, RBCs red (R > B) mostly.
    assert (rgb[..., 0].astype(int) - rgb[..., 2]).mean() > 0
    plain.close()
    packed_scope.close()


def test_twelve_bit_colour_is_scaled_by_the_camera_bit_depth(slide):
    """A 12-bit colour camera's white is 4095: scaled by its bit depth it is 255 (shifting
    by 8 bits made every field nearly black)."""
    scope = virtual_scope(slide)
    rgb = scope.snap_rgb()
    scope.close()
    twelve = (rgb.astype(np.uint32) * 4095 // 255).astype(np.uint16)
    back = rgb_from_camera(twelve, 12)
    assert np.abs(back.astype(int) - rgb).max() <= 1 and back.max() == rgb.max()
    assert rgb_from_camera(twelve).max() <= 16  # read as 16-bit it is dark


def test_monochrome_frames_are_refused():
    with pytest.raises(AcquisitionError, match="colour"):
        rgb_from_camera(np.zeros((4, 4), np.uint16))


def test_stage_refuses_moves_outside_the_slide(slide):
    scope = virtual_scope(slide, retries=0)
    with pytest.raises(AcquisitionError, match="outside the stage limits"):
        scope.move_xy(-10.0, 5.0)
    scope.close()
