"""Review app settings."""

from __future__ import annotations

from pydantic import Field

from pipeline.params import Params


class ReviewParams(Params):
    host: str
    port: int = Field(ge=0, le=65535)
