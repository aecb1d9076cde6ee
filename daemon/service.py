"""The long-running service: slide queue, acquisition loop, resume, signals."""

from __future__ import annotations

from pipeline.params import Params


class ServiceParams(Params):
    poll_seconds: float
