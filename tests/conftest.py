"""Shared fixtures: where the read-only real data lives, and the loaded default config."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = (REPO.parent / "shared" / "data").resolve()
PBC = SHARED_DATA / "pbc"
BCCD = SHARED_DATA / "bccd" / "BCCD"
ZHENG = SHARED_DATA / "zheng"
WSI = SHARED_DATA / "wsi"

PBC_UM_PER_PX = 0.10
BCCD_UM_PER_PX = 0.072


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def config():
    from daemon.config import load_config

    return load_config()
