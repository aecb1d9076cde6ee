"""marrowcount check-config: validate a configuration file and show the effective values."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
import yaml

from daemon.cli.app import ConfigOpt, app, console
from daemon.config import load_config


@app.command("check-config")
def check_config(
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Validate CONFIG over the defaults and print the effective configuration."""
    cfg = load_config(config)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False)
