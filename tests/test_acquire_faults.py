"""Injected faults: failed snaps and stage timeouts are retried, never double counted."""

from __future__ import annotations

import pytest

from drivers.acquisition import FieldResult, count_slide
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
