"""Which software, classifier model and settings counted a field.

The service stores this with every analysed field, so a report names the method behind its
machine count (ISO 15189 asks a lab to know which examination procedure and version gave
each result), and a slide counted partly under another model or other settings, after a
restart with a new config, says so instead of mixing them silently.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

SETTINGS_SECTIONS = ("detect", "analysis", "acquisition.quality", "acquisition.prescan",
                     "acquisition.autofocus", "watch.wsi")
"""Config sections that change which cells are found and how they are called, besides the
classifier's own settings, and which fields are counted (the quality gate, the pre-scan,
focus, a scanner file's tiling): a quality gate tightened had counted 291 cells in 17 fields
instead of 507 in 20 under the same fingerprint. Not `stats`: a report computes its
intervals and flags with the settings of its printing (and says them), and a reference
interval changed mid-slide is no second method of counting."""


def _section(cfg: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        cfg = getattr(cfg, key)
    return cfg


@lru_cache(maxsize=1)
def software_version() -> str:
    """The package version, with the source commit when run from a git checkout
    (``0.1.0+g1a2b3c4d5e6f``, ``…-dirty`` with changes not committed): the version number
    alone named every build since the first, and an editable install runs what is there."""
    try:
        base = version("marrowcount")
    except PackageNotFoundError:  # run from a source tree that was never installed
        base = "unknown"
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return base
    commit = git_commit(root)
    return f"{base}+{commit}" if commit else base


def git_commit(root: Path) -> str | None:
    """``g<12 hex digits>`` of the checkout at ``root``, ``-dirty`` with changes not
    committed; None without git or a readable checkout (logged)."""
    import logging
    import os
    import subprocess

    # The documented install clones as root and runs as the service user: git (2.35.2+)
    # refuses a checkout another user owns ("dubious ownership"), and every result had said
    # plain "0.1.0". Reading it changes nothing there, and the index is not refreshed.
    git = ["git", "-c", f"safe.directory={root}"]
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        head = subprocess.run([*git, "rev-parse", "--short=12", "HEAD"], cwd=root, env=env,
                              capture_output=True, text=True, timeout=10)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, env=env, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:  # no git on the machine
        logging.getLogger("marrowcount").warning("source commit not known: %s", exc)
        return None
    if head.returncode or not head.stdout.strip():
        logging.getLogger("marrowcount").warning(
            "source commit not known: git: %s", head.stderr.strip().splitlines()[:1])
        return None
    return f"g{head.stdout.strip()}" + ("-dirty" if dirty.stdout.strip() else "")


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, computed once per (path, size, modification time)."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def analysis_method(cfg: Any, model: str, model_sha256: str, precision: str,
                    crop_um_per_px: float) -> dict[str, Any]:
    """The method a field is counted with, as plain data: software version, checkpoint file
    name and SHA-256 (of the bytes loaded; 16 hex digits kept), the precision the classifier
    runs at (``int8`` can fall back to ``bf16``), the scale its stored crops are cut at, the
    taxonomy, and a fingerprint (12 hex digits) of the settings that change a cell's detection
    or call."""
    classifier = cfg.classifier.model_dump(mode="json", exclude={"checkpoint", "batch_size"})
    settings = {"taxonomy": cfg.taxonomy, "classifier": classifier,
                **{k: _section(cfg, k).model_dump(mode="json") for k in SETTINGS_SECTIONS}}
    blob = json.dumps(settings, sort_keys=True).encode()
    return {
        "software": software_version(),
        "model": model,
        "model_sha256": model_sha256[:16],
        "precision": precision,
        "crop_um_per_px": float(crop_um_per_px),
        "taxonomy": cfg.taxonomy,
        "settings": hashlib.sha256(blob).hexdigest()[:12],
        # The settings themselves, so that the fingerprint on a report can be looked up.
        "settings_used": settings,
    }


def method_text(m: dict[str, Any]) -> str:
    """One line for a report: ``marrowcount 0.1.0 · model default.pt (sha256 1a2b…) int8 ·
    taxonomy pbc11 · settings 3c4d…``."""
    if "model_sha256" not in m:
        return "not recorded (counted before marrowcount recorded its method)"
    return (f"marrowcount {m.get('software', '?')} · model {m.get('model', '?')} "
            f"(sha256 {m.get('model_sha256', '?')}) {m.get('precision', '?')} · taxonomy "
            f"{m.get('taxonomy', '?')} · settings {m.get('settings', '?')}")
