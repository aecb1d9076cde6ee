"""Software autofocus on the virtual microscope's tilted focal plane."""

from __future__ import annotations

import numpy as np
import pytest

from drivers.autofocus import find_focus
from drivers.micromanager import MicroscopeFieldSource
from tests.acquire_fixtures import bccd_slide, detect_params, virtual_scope

TILTED = {"tilt_x_um_per_mm": 25.0, "tilt_y_um_per_mm": -15.0, "focus_z_um": 5.0}


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return bccd_slide(tmp_path_factory.mktemp("af"), 5, 4, start=20)


def test_every_field_is_focused_within_1um_of_the_tilted_plane(slide):
    scope = virtual_scope(slide, virtual=TILTED, quality={"enabled": False})
    plan = scope.plan(None)
    source = MicroscopeFieldSource(scope, plan, scope.params, detect_params())
    fields = list(source.fields())
    assert [f.index for f in fields] == list(range(len(plan))) and len(fields) == 20
    errors = np.array([f.stage_z - scope.virtual.plane.z_at(f.stage_x, f.stage_y) for f in fields])
    # the plane spans several µm over the slide, so a fixed Z would not do
    zs = [scope.virtual.plane.z_at(x, y) for x, y in plan.positions]
    assert max(zs) - min(zs) > 3
    assert np.all(np.abs(errors) <= 1.0), errors.round(2)
    # later fields start from their neighbour's focus: few Z moves each
    assert scope.z_moves / len(fields) < 10
    scope.close()


def test_search_finds_focus_from_a_rough_start_far_off(slide):
    scope = virtual_scope(slide, virtual=TILTED)
    x, y = 150.0, 70.0
    scope.move_xy(x, y)
    truth = scope.virtual.plane.z_at(x, y)
    start = truth - 9.0
    scope.move_z(start)
    res = find_focus(scope.move_z, scope.snap_rgb, start, scope.um_per_px, scope.params.autofocus)
    assert res.found and abs(res.z - truth) <= 0.5
    assert scope.get_z() == pytest.approx(res.z)  # the drive is left at focus
    scope.close()


def test_featureless_glass_keeps_the_start_position(slide):
    scope = virtual_scope(slide, virtual=TILTED)
    scope.move_xy(0.0, 0.0)  # slide corner: three quarters of the frame is glass
    scope.virtual.xy.limits_um = (-1000.0, -1000.0, 1000.0, 1000.0)
    scope.move_xy(-500.0, -500.0)  # all glass
    z0 = scope.get_z()
    res = find_focus(scope.move_z, scope.snap_rgb, z0, scope.um_per_px, scope.params.autofocus)
    assert not res.found and res.z == z0 and scope.get_z() == pytest.approx(z0)
    scope.close()
