"""Playwright in Debian's chromium (never a downloaded browser) against a live review app.

The app is served by uvicorn on 127.0.0.1 on a free port, in a thread, over a private copy of
the review test store (tests/review_slide.py); each test gets its own copy.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.review_slide import copy_env, pipeline_fields, review_template  # noqa: F401  (fixtures)

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "review"


def pytest_collection_modifyitems(items):
    for item in items:
        if Path(str(item.fspath)).parent == Path(__file__).parent:
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    if not CHROMIUM.exists():
        pytest.skip("Debian chromium is not installed (make chromium installs it)")
    return {
        **browser_type_launch_args,
        "executable_path": str(CHROMIUM),
        "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"],
    }


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1400, "height": 900},
            "accept_downloads": True}


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live(review_template, tmp_path_factory):  # noqa: F811
    """(base_url, ReviewEnv) of a review app served over a fresh copy of the test store."""
    import uvicorn

    from daemon.review.app import create_app

    env = copy_env(review_template, tmp_path_factory.mktemp("live-store"))
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(env.cfg, env.store), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("review app did not start")
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/login", timeout=10).status_code == 200  # it answers
    try:
        yield base, env
    finally:
        server.should_exit = True
        thread.join(10)
        env.store.close()
        shutil.rmtree(env.root, ignore_errors=True)
