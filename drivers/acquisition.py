"""Acquisition settings shared by the microscope and scanner drivers."""

from __future__ import annotations

from pydantic import Field

from pipeline.params import Params


class AcquisitionParams(Params):
    target: int = Field(gt=0)
