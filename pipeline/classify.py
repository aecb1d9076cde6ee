"""Dual-stage classification of cell crops with a trained checkpoint."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from pipeline.params import Params


class ClassifierParams(Params):
    checkpoint: Path
    batch_size: int = Field(gt=0)
