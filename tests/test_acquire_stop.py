"""Stop at N: count fields as they arrive, cancel the MDA at the target, resume exactly."""

from __future__ import annotations

import itertools

import pytest

from drivers.acquisition import FieldResult, count_slide
from drivers.micromanager import MicroscopeFieldSource
from tests.acquire_fixtures import bccd_slide, detect_params, real_analyzer, virtual_scope

# Peripheral-blood fields hold one or two leukocytes: count every field.
GATE_OFF = {"quality": {"min_nucleated": 1, "min_sharpness": 0.0}}


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return bccd_slide(tmp_path_factory.mktemp("stop"), 4, 3, start=40)


@pytest.fixture(scope="module")
def analyze():
    return real_analyzer()


@pytest.fixture(scope="module")
def full(slide, analyze):
    """The whole slide counted without stopping: the reference for the other runs."""
    stopped, fields, _, _ = _run(slide, analyze, 10_000)
    assert stopped == "area_exhausted" and [f.index for f in fields] == list(range(12))
    return fields


def _run(slide, analyze, target, start_index=0, counted_so_far=0, should_stop=None,
         fields_out=None, **over):
    scope = virtual_scope(slide, **{**GATE_OFF, **over})
    source = MicroscopeFieldSource(scope, scope.plan(None), scope.params, detect_params())
    fields: list[FieldResult] = []
    if fields_out is not None:
        fields_out.append(fields)
    stopped = count_slide(
        source, analyze, target, start_index=start_index, counted_so_far=counted_so_far,
        on_field=fields.append, should_stop=should_stop or (lambda: False),
    )
    scope.close()
    return stopped, fields, source, scope


def test_stops_at_the_field_that_reaches_the_target(slide, analyze, full):
    running = list(itertools.accumulate(f.n_counted for f in full))
    # target: the count after the second field that holds leukocytes (peripheral blood has
    # one or two per field), so the run must stop well before the end of the slide
    hits = [i for i, f in enumerate(full) if f.n_counted]
    assert len(hits) >= 2 and hits[1] < 9, "the slide must hold leukocytes early on"
    last, target = hits[1], running[hits[1]]
    stopped, fields, source, scope = _run(slide, analyze, target)
    assert stopped == "target_reached"
    assert [f.index for f in fields] == list(range(last + 1))  # nothing beyond that field
    counts = [f.n_counted for f in fields]
    assert sum(counts) >= target and sum(counts[:-1]) < target
    assert counts == [f.n_counted for f in full[: len(fields)]]
    # the MDA was cancelled: beyond the last field counted, only the prefetched fields, the
    # one waiting to be queued and the one in progress were acquired
    assert source.frames_acquired <= len(fields) + scope.params.prefetch_fields + 2 < 12


def test_resume_after_a_stop_is_exact(slide, analyze, full):
    # stop after 5 fields, as a service shut down mid-slide would
    box: list[list[FieldResult]] = []
    stopped, fields, _, _ = _run(slide, analyze, 10_000, should_stop=lambda: len(box[0]) >= 5,
                                 fields_out=box)
    assert stopped == "stopped" and [f.index for f in fields] == list(range(5))
    # restart: a fresh microscope, from the last committed field on
    counted = sum(f.n_counted for f in fields)
    stopped2, rest, _, _ = _run(slide, analyze, 10_000, start_index=5, counted_so_far=counted)
    assert stopped2 == "area_exhausted"
    both = fields + rest
    assert [f.index for f in both] == list(range(12))  # every field once, none twice
    assert [f.n_counted for f in both] == [f.n_counted for f in full]
