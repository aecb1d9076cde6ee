"""Watch a slide scanner's output folder and turn new files into slides to count."""

from __future__ import annotations

from pipeline.params import Params


class WatchParams(Params):
    folders: tuple[str, ...]
