"""One field in, the cells counted in it out: detect, classify, guide, suppress duplicates."""

from __future__ import annotations

from pydantic import Field

from pipeline.params import Params


class AnalyzeParams(Params):
    guidance_threshold: float = Field(gt=0, le=1)
