"""Leukocyte detection: saliency, clustering, watershed splitting and lobe merging."""

from __future__ import annotations

from pydantic import Field

from pipeline.params import Params


class DetectParams(Params):
    work_um_per_px: float = Field(gt=0)
