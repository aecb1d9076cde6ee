"""Differential statistics: exact 95% intervals, M:E ratio, blast %, threshold flags."""

from __future__ import annotations

from pydantic import Field

from pipeline.params import Params


class StatsParams(Params):
    blast_thresholds_pct: tuple[float, ...] = Field(min_length=0)
