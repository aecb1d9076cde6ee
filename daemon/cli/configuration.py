"""marrowcount check-config: validate a configuration file and show the effective values."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
import yaml

from daemon.cli.app import ConfigOpt, app, console
from daemon.config import load_config


@app.command("check-config")
def check_config(
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Validate CONFIG over the defaults and print the effective configuration, then the
    paths it resolves to and a warning for each one the service could not use."""
    cfg = load_config(config)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False)
    for line in path_report(cfg):
        console.print(line, highlight=False, markup=False, soft_wrap=True)


def path_report(cfg: Any) -> list[str]:
    """The config's paths as the service resolves them, each with what is wrong with it here
    (the schema checks values, not the machine): "warning: …" lines for a missing model file,
    a missing or read-only store, data, watch or export folder."""
    import os

    from daemon.store import resolve_url

    out = []

    def folder(what: str, path: Path, made: bool = True) -> None:
        """``made``: the service makes it when missing (where it may write)."""
        out.append(f"{what}: {path}")
        near = next((p for p in (path, *path.parents) if p.exists()), None)
        if not path.exists():
            if not made:
                out.append(f"warning: {what} {path} does not exist: make it now, owned by the "
                           "service user (systemd/README.md)")
            elif near is None or not os.access(near, os.W_OK):
                out.append(f"warning: {what} {path} does not exist and cannot be made "
                           f"under {near} by this user")
        elif not os.access(path, os.W_OK):
            out.append(f"warning: {what} {path} is not writable by this user")

    checkpoint = cfg.resolve(cfg.classifier.checkpoint)
    out.append(f"model: {checkpoint}")
    if not checkpoint.is_file():
        out.append(f"warning: model {checkpoint} does not exist: the daemon will not start")
    url = resolve_url(cfg.store.url, cfg.resolve)
    out.append(f"store: {url}")
    if url.startswith("sqlite:///"):
        folder("store folder", Path(url[len("sqlite:///"):]).parent)
    folder("data folder", cfg.resolve(cfg.store.data_dir))
    for f in cfg.watch.folders:
        folder("watch folder", cfg.resolve(f.path), made=False)
    if cfg.review.export_dir is not None:
        # Under systemd the review app cannot make it (ProtectSystem), and sign-offs wait.
        folder("LIS export folder", cfg.resolve(cfg.review.export_dir), made=False)
    return out
