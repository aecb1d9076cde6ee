"""marrowcount acquisition commands."""

from daemon.cli.app import app, console, err_console  # noqa: F401
