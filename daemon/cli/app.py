"""The one typer app behind ``marrowcount``; command modules register on it."""

from __future__ import annotations

import typer
from rich.console import Console

app = typer.Typer(
    name="marrowcount",
    help="Unattended bone-marrow leukocyte differential counter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Unattended bone-marrow leukocyte differential counter."""
