"""The SQLAlchemy store: slides, fields, cells, counts, reviews and audit events."""

from __future__ import annotations

from pipeline.params import Params


class StoreParams(Params):
    url: str
    data_dir: str
