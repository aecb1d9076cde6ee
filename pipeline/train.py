"""Training of the global and local models from labelled crops."""

from __future__ import annotations

from pydantic import Field

from pipeline.params import Params


class TrainParams(Params):
    seed: int
    epochs: int = Field(gt=0)
