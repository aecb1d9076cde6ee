"""Injected faults: failed snaps and stage timeouts are retried, never double counted."""

from __future__ import annotations

import pytest

from drivers.acquisition import FieldResult, HardwareFault, count_slide
from drivers.micromanager import MicroscopeFieldSource
from tests.acquire_fixtures import bccd_slide, detect_params, real_analyzer, virtual_scope

GATE = {"quality": {"min_nucleated": 1, "min_sharpness": 0.0}, "backoff_s": 0.001}


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return bccd_slide(tmp_path_factory.mktemp("faults"), 4, 3, start=60)


@pytest.fixture(scope="module")
def analyze():
    return real_analyzer()


def _count(slide, analyze, **virtual):
    scope = virtual_scope(slide, virtual=virtual, **GATE)
    source = MicroscopeFieldSource(scope, scope.plan(None), scope.params, detect_params())
    fields: list[FieldResult] = []
    stopped = count_slide(source, analyze, 10_000, on_field=fields.append)
    scope.close()
    return stopped, fields, scope, source


def test_faulty_hardware_still_gives_the_same_counts(slide, analyze):
    stopped, clean, _, _ = _count(slide, analyze)
    assert stopped == "area_exhausted"
    stopped, faulty, scope, source = _count(
        slide, analyze, snap_failure_rate=0.10, stage_timeout_rate=0.05, seed=7
    )
    assert stopped == "area_exhausted"
    faults = scope.virtual.faults
    assert faults.snap_failures >= 3 and faults.stage_timeouts >= 2  # faults did happen
    # every field handed on exactly once, in order, and counted as without faults
    assert [f.index for f in faulty] == [f.index for f in clean] == list(range(12))
    assert source.frames_acquired == 12
    assert [f.n_counted for f in faulty] == [f.n_counted for f in clean]
    assert [sorted(c.label for c in f.cells) for f in faulty] == [
        sorted(c.label for c in f.cells) for f in clean
    ]


def test_a_camera_that_keeps_failing_fails_the_slide_with_the_reason(slide, analyze):
    stopped, fields, scope, _ = _count(slide, analyze, snap_failure_rate=1.0)
    assert stopped.startswith("failed: camera snap failed 5 times")
    assert fields == []


def test_a_stage_that_keeps_timing_out_fails_the_slide(slide, analyze):
    stopped, fields, _, _ = _count(slide, analyze, stage_timeout_rate=1.0)
    assert stopped.startswith("failed: XY stage move") and "timed out" in stopped


def test_a_dark_lamp_stops_the_slide_as_a_fault_and_loses_no_field(slide, analyze):
    """Lamp off: every field is dark. The slide stops as a hardware fault after
    ``fault_after_fields`` of them, none handed on, so it resumes where the lamp failed
    (counting on had "used up" the whole area as thin smear with 0 cells)."""
    scope = virtual_scope(slide, **GATE)
    source = MicroscopeFieldSource(scope, scope.plan(None), scope.params, detect_params())
    scope.virtual.lamp.set_open(False)
    fields: list[FieldResult] = []
    with pytest.raises(HardwareFault, match=r"5 fields in a row from field 0 were dark: "
                                            r"mean brightness 0 < 40"):
        count_slide(source, analyze, 10_000, on_field=fields.append, fault_after=5)
    assert fields == []
    # Mended: the same slide counts from its first field, as if nothing had happened.
    scope.virtual.lamp.set_open(True)
    stopped = count_slide(source, analyze, 10_000, on_field=fields.append, fault_after=5)
    scope.close()
    _, clean, _, _ = _count(slide, analyze)
    assert stopped == "area_exhausted" and [f.index for f in fields] == list(range(12))
    assert [f.n_counted for f in fields] == [f.n_counted for f in clean]


def test_a_few_dark_fields_are_handed_on_as_skipped_in_order(slide, analyze):
    """The lamp flickers off for two fields: they wait, then go on as skipped, in order,
    before the next good field; a run that ends dark hands its last ones on too."""
    import dataclasses

    import numpy as np

    from pipeline.quality import assess_field

    _, clean, scope, _ = _count(slide, analyze)

    def dark(f: FieldResult) -> FieldResult:
        black = np.zeros_like(f.image)
        q = assess_field(black, f.um_per_px, scope.params.quality, detect_params())
        return dataclasses.replace(f, image=black, cells=[], quality=q.as_dict(),
                                   skipped_reason=q.reason)

    class Replay:
        def __init__(self, fields: list[FieldResult]) -> None:
            self.list = fields

        def fields(self, start: int):
            return iter([f for f in self.list if f.index >= start])

    raw = [dataclasses.replace(f, cells=[]) for f in clean]
    flicker = [dark(f) if f.index in (3, 4, 10, 11) else f for f in raw]
    got: list[FieldResult] = []
    stopped = count_slide(Replay(flicker), analyze, 10_000, on_field=got.append, fault_after=3)
    assert stopped == "area_exhausted" and [f.index for f in got] == list(range(12))
    assert [f.index for f in got if (f.skipped_reason or "").startswith("dark:")] == [3, 4, 10, 11]
    assert [f.n_counted for f in got if f.index not in (3, 4, 10, 11)] == [
        f.n_counted for f in clean if f.index not in (3, 4, 10, 11)]


def test_the_stage_waits_for_analysis_beyond_the_prefetch(slide):
    """Frames are handed on from the MDA thread itself: with analysis slow, the stage is at
    most ``prefetch_fields`` fields ahead (a relay thread had let it tour the whole plan)."""
    import time

    scope = virtual_scope(slide, prefetch_fields=1, **GATE)
    source = MicroscopeFieldSource(scope, scope.plan(None), scope.params, detect_params())
    ahead = []

    def slow(rgb, um_per_px):
        time.sleep(0.3)
        ahead.append(scope.xy_moves - len(ahead))  # fields the stage has gone to, beyond
        return []

    count_slide(source, slow, 10_000)
    scope.close()
    assert len(ahead) == 12 and max(ahead) <= 3, ahead


def test_a_stage_that_stops_at_its_limit_is_caught(slide, analyze):
    """A controller that clamps a move to its travel range reports success; read back, the
    position is wrong and the slide fails with it (each clamped field had been counted as
    another field of the same place)."""
    scope = virtual_scope(slide, retries=1, **GATE)
    xy = scope.virtual.xy
    x0, y0, x1, y1 = xy.limits_um

    def clamp(x, y):
        xy._pos = (min(max(x, x0), x1), min(max(y, y0), y1))

    xy.set_position_um = clamp
    scope.stage_limits_um = None  # real hardware with no limits configured
    plan = scope.plan(((x0, y0), (2 * x1, y1)))
    source = MicroscopeFieldSource(scope, plan, scope.params, detect_params())
    fields: list[FieldResult] = []
    stopped = count_slide(source, analyze, 10_000, on_field=fields.append)
    scope.close()
    assert stopped.startswith("failed: XY stage move to") and "after the move" in stopped
    inside = [p for p in plan.positions if p[0] <= x1]
    assert len(fields) <= len(inside)
    assert all(f.stage_x <= x1 for f in fields)


def test_a_hardware_autofocus_that_loses_lock_falls_back_to_the_image_search(slide, analyze):
    # A tilted slide: a field left at the last locked Z would be out of focus, so only an
    # image search that really ran puts each later field in focus.
    tilted = {"tilt_x_um_per_mm": 25.0, "tilt_y_um_per_mm": -15.0, "focus_z_um": 5.0}
    scope = virtual_scope(slide, **GATE, virtual=tilted,
                          autofocus={"enabled": True, "use_hardware": True})
    calls = {"n": 0}

    def full_focus():
        calls["n"] += 1
        if calls["n"] > 2:  # locks for two fields, then never again (a gap in the smear)
            raise RuntimeError("Autofocus: no focus signal found")

    scope.core.getAutoFocusDevice = lambda: "AF"
    scope.core.fullFocus = full_focus
    source = MicroscopeFieldSource(scope, scope.plan(None), scope.params, detect_params())
    fields: list[FieldResult] = []
    stopped = count_slide(source, analyze, 10_000, on_field=fields.append)
    plane = scope.virtual.plane
    scope.close()
    assert stopped == "area_exhausted" and [f.index for f in fields] == list(range(12))
    assert calls["n"] > 2 and sum(f.n_counted for f in fields) > 0
    zs = [plane.z_at(f.stage_x, f.stage_y) for f in fields[2:]]
    assert max(zs) - min(zs) > 1.5  # the slide's tilt moves focus between these fields
    errors = [abs(f.stage_z - z) for f, z in zip(fields[2:], zs)]
    assert max(errors) <= 1.0, errors
