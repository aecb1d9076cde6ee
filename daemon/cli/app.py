"""The one typer app behind ``marrowcount``; command modules register on it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(
    name="marrowcount",
    help="Unattended bone-marrow leukocyte differential counter.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)
console = Console()
err_console = Console(stderr=True)
# Every command that reads the config takes it the same way.
ConfigOpt = typer.Option(None, "--config", "-c", help="Lab config YAML over the defaults.")


@app.callback()
def _root() -> None:
    """Unattended bone-marrow leukocyte differential counter."""


def operator() -> str:
    """Who runs this command, for the audit trail: the person behind ``sudo -u marrowcount``
    (``SUDO_USER``), not the service account every documented command runs as."""
    import getpass
    import os

    return os.environ.get("SUDO_USER") or getpass.getuser()


def file_error(path: Path, exc: Exception | str) -> None:
    """One error line on stderr for one input file (named once); the others go on."""
    msg = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
    err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
