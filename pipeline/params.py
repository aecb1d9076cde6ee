"""Base class for validated, immutable parameter sets.

Every value has its default in ``config/default.yaml`` (the one place defaults live); the
models here state types and bounds, forbid unknown keys, and are frozen so they can be
passed around as plain data.
"""

from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
