"""``marrowcount`` command line: a thin typer + rich layer over the library API."""

from __future__ import annotations

import sys

from daemon.cli import (  # noqa: F401  (each module registers its commands on the app)
    acquisition,
    analysis,
    classification,
    configuration,
    detection,
    review,
    service,
    watcher,
)
from daemon.cli.app import app, err_console
from pipeline.errors import MarrowError


def main() -> None:
    """Entry point: a MarrowError becomes one clear line on stderr and exit status 2."""
    try:
        app()
    except MarrowError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
