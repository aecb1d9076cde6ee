"""A slide counted by the real pipeline, plus users, for the review app's tests and bench.

The slide is built once per test session: real BCCD blood fields (640×480 at 0.072 µm/px) go
through ``pipeline.analyze.analyze_field`` with the shipped classifier, and each field is
committed through ``Store.commit_field`` exactly as the daemon does. Each test then gets its
own copy of that store (database and data directory), so tests never see each other's changes.
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import BCCD, BCCD_UM_PER_PX

TECH = ("tech", "tech-password-1")
TECH2 = ("tech2", "tech-password-2")
SUPER = ("super", "super-password-1")
SLIDE_NAME = "BCCD review slide"
N_FIELDS = 40  # ~1 leukocyte per BCCD field; margin for a model that calls some non-leukocyte


@dataclass
class ReviewEnv:
    root: Path
    cfg: object
    store: object
    slide_id: int

    @property
    def url(self) -> str:
        return f"sqlite:///{self.root / 'store.db'}"


def bccd_fields(n: int, start: int = 0) -> list[Path]:
    """The first ``n`` BCCD field images (sorted by name) from ``start``."""
    return sorted((BCCD / "JPEGImages").glob("BloodImage_*.jpg"))[start:start + n]


def analyzed_fields(cfg, paths: list[Path]) -> list:
    """``paths`` (BCCD fields) through the real pipeline: one FieldResult per image."""
    from drivers.acquisition import FieldResult
    from pipeline.analyze import analyze_field
    from pipeline.classify import load_classifier
    from pipeline.imaging import read_rgb

    classifier = load_classifier(cfg.resolve(cfg.classifier.checkpoint), cfg.classes,
                                 params=cfg.classifier)
    out = []
    for i, path in enumerate(paths):
        rgb = read_rgb(path)
        cells = analyze_field(rgb, BCCD_UM_PER_PX, classifier, cfg.detect, cfg.analysis)
        out.append(FieldResult(
            index=i, stage_x=float(i * 50), stage_y=0.0, stage_z=None, tile=path.name,
            um_per_px=BCCD_UM_PER_PX, image=rgb, quality={}, skipped_reason=None, cells=cells))
    return out


def count_slide(store, cfg, name: str, fields: list, *, status: str = "awaiting_review",
                target: int | None = None, min_cells: int = 0) -> int:
    """Create a slide and commit ``fields`` to it as the daemon does.

    With ``min_cells`` the fields are committed again (as further fields, same cells) until
    the slide holds at least that many cells: a large slide made of real pipeline output.
    """
    import dataclasses

    from daemon.provenance import analysis_method, file_sha256
    from pipeline.classify import read_checkpoint

    path = cfg.resolve(cfg.classifier.checkpoint)
    method = analysis_method(cfg, path.name, file_sha256(path), cfg.classifier.precision,
                             float(read_checkpoint(path)["um_per_px"]))
    sid = store.create_slide(name, "folder", str(BCCD), target or cfg.acquisition.target,
                             cfg.taxonomy, um_per_px=BCCD_UM_PER_PX)
    store.set_status(sid, "acquiring")
    index = n_cells = 0
    while (n_cells < min_cells) if min_cells else (index < len(fields)):
        fld = fields[index % len(fields)]
        store.commit_field(sid, dataclasses.replace(fld, index=index), method)
        n_cells += len(fld.cells)
        index += 1
        if not any(f.cells for f in fields):
            break
    if status != "acquiring":
        store.set_status(sid, status)
    return sid


def add_users(store) -> None:
    from daemon.review.auth import create_user

    with store.session() as s:
        create_user(s, *TECH, "technician")
        create_user(s, *TECH2, "technician")
        create_user(s, *SUPER, "supervisor")


@pytest.fixture(scope="session")
def pipeline_fields() -> list:
    """The test slide's fields, analysed once per session by the real pipeline."""
    from daemon.config import load_config

    return analyzed_fields(load_config(), bccd_fields(N_FIELDS))


@pytest.fixture(scope="session")
def review_template(tmp_path_factory, pipeline_fields) -> tuple[Path, int]:
    """A store folder (store.db + data/) with users and one slide counted by the pipeline."""
    from daemon.config import load_config
    from daemon.store import Store

    root = tmp_path_factory.mktemp("review-template")
    cfg = load_config()
    store = Store(f"sqlite:///{root / 'store.db'}", root / "data")
    try:
        add_users(store)
        sid = count_slide(store, cfg, SLIDE_NAME, pipeline_fields)
    finally:
        store.close()
    return root, sid


def copy_env(template: tuple[Path, int], dest: Path) -> ReviewEnv:
    from daemon.config import load_config
    from daemon.store import Store

    root, sid = template
    shutil.copytree(root, dest, dirs_exist_ok=True)
    store = Store(f"sqlite:///{dest / 'store.db'}", dest / "data")
    return ReviewEnv(dest, load_config(), store, sid)


@pytest.fixture
def review_env(review_template, tmp_path) -> ReviewEnv:
    env = copy_env(review_template, tmp_path / "store")
    yield env
    env.store.close()


CSRF_RE = re.compile(r'name="csrf[-_]token" (?:content|value)="([^"]+)"')


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m, "page carries no CSRF token"
    return m.group(1)


def login(client, user: tuple[str, str]) -> str:
    """Log ``client`` (httpx/TestClient) in through the form; returns the session's CSRF token."""
    page = client.get("/login")
    r = client.post("/login", data={"username": user[0], "password": user[1],
                                    "csrf_token": csrf_of(page.text), "next": "/"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    return csrf_of(client.get("/").text)


def check_flags(store, slide_id: int, username: str = TECH[0]) -> int:
    """Confirm every flagged cell of the slide as its machine class, as a reviewer does with
    its own class key before sign-off (``review.require_flags_checked``); returns how many."""
    from sqlalchemy import select

    from daemon.config import load_config
    from daemon.models import Cell
    from daemon.review import actions

    cfg = load_config()
    with store.session() as s:
        flagged = [c for c in s.scalars(select(Cell).where(Cell.slide_id == slide_id))
                   if c.flag_open]
        for c in flagged:
            actions.reclassify(s, slide_id, [c.id], c.label, actions.Reviewer(username, "technician"),
                               {cfg.taxonomy: cfg.classes})
    return len(flagged)


def client_as(cfg, store, user: tuple[str, str] = TECH):
    """A TestClient of the review app logged in as ``user``; ``client.token`` is its CSRF
    token, also sent as the header the JSON API wants."""
    from fastapi.testclient import TestClient

    from daemon.review.app import create_app

    client = TestClient(create_app(cfg, store))
    client.token = login(client, user)
    client.headers["X-CSRF-Token"] = client.token
    return client


SEEN_RE = re.compile(r'name="seen" value="(\d+)"')


def seen_of(client, slide_id: int) -> str:
    """The last audit event the slide page shows, as its sign-off form posts it."""
    m = SEEN_RE.search(client.get(f"/slides/{slide_id}").text)
    assert m, "slide page has no sign-off form"
    return m.group(1)


def sign_form(client, slide_id: int, token: str | None = None, **fields):
    """Post the slide page's sign-off form as a browser does: the page is read first, and
    the reviewer ticks that every counted cell was looked at (pbc11's blasts are named by
    review only)."""
    data = {"csrf_token": token or client.token, "seen": seen_of(client, slide_id),
            "all_cells_seen": "true", **fields}
    return client.post(f"/slides/{slide_id}/sign", data=data, follow_redirects=False)
