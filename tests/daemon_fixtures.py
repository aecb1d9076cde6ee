"""Real fields for store, report and service tests, assembled from the shared data.

A field is a real BCCD blood field (640×480 at 0.072 µm/px). Its cells are the field's own
annotated boxes: each RBC box becomes a non-leukocyte cut from the field, each WBC box a
leukocyte whose crop and label come from a real expert-labelled PBC cell, so labels are true
labels, not invented ones. A few cells are marked as duplicates, as the analysis marks a
lobed neutrophil detected twice.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from functools import lru_cache

import numpy as np

from drivers.acquisition import FieldResult
from pipeline.analyze import CellResult
from pipeline.imaging import crop_at, read_rgb
from tests.conftest import BCCD, BCCD_UM_PER_PX, PBC, PBC_UM_PER_PX

CROP_UM_PER_PX = 0.2
PBC11 = ("promyelocyte", "myelocyte", "metamyelocyte", "band_neutrophil",
         "segmented_neutrophil", "eosinophil", "basophil", "monocyte", "erythroblast",
         "lymphocyte")

@lru_cache(maxsize=None)
def pbc_paths(label: str, n: int = 40) -> tuple[str, ...]:
    with open(PBC / "manifest.csv", newline="") as fh:
        rows = [r["path"] for r in csv.DictReader(fh) if r["label"] == label]
    return tuple(rows[:n])


@lru_cache(maxsize=64)
def _pbc_crop(path: str) -> np.ndarray:
    rgb = read_rgb(PBC / path)
    h, w = rgb.shape[:2]
    return crop_at(rgb, PBC_UM_PER_PX, (w / 2, h / 2), CROP_UM_PER_PX)


@lru_cache(maxsize=1)
def _bccd_names() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in (BCCD / "Annotations").glob("*.xml")
                        if (BCCD / "JPEGImages" / f"{p.stem}.jpg").is_file()))


@lru_cache(maxsize=32)
def _bccd(i: int) -> tuple[np.ndarray, tuple[tuple[str, tuple[int, int, int, int]], ...]]:
    name = _bccd_names()[i]
    rgb = read_rgb(BCCD / "JPEGImages" / f"{name}.jpg")
    objs = []
    for o in ET.parse(BCCD / "Annotations" / f"{name}.xml").getroot().iter("object"):
        bb = o.find("bndbox")
        box = tuple(int(float(bb.find(k).text)) for k in ("xmin", "ymin", "xmax", "ymax"))
        objs.append((o.find("name").text, box))
    return rgb, tuple(objs)


def _probs(label: str, conf: float) -> dict[str, float]:
    rest = (1.0 - conf) / (len(PBC11))
    p = {c: rest for c in PBC11 + ("non_leukocyte",)}
    p[label] = conf + rest
    return p


def make_field(index: int, seed: int = 0, *, with_image: bool = True) -> FieldResult:
    """Field ``index`` of a test slide: the ``index % 40``-th BCCD image with real cells.

    Deterministic in (index, seed). Every fourth leukocyte is followed by a duplicate of it.
    """
    rng = np.random.default_rng(seed * 100_003 + index)
    rgb, objs = _bccd(index % 40)
    cells: list[CellResult] = []
    for kind, (x0, y0, x1, y1) in objs:
        if kind == "Platelets":
            continue
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        area = (x1 - x0) * (y1 - y0) * BCCD_UM_PER_PX**2 * np.pi / 4
        if kind == "WBC":
            label = PBC11[int(rng.integers(len(PBC11)))]
            paths = pbc_paths(label)
            crop = _pbc_crop(paths[int(rng.integers(len(paths)))])
        else:
            label = "non_leukocyte"
            crop = crop_at(rgb, BCCD_UM_PER_PX, (cx, cy), CROP_UM_PER_PX)
        conf = float(rng.uniform(0.55, 0.99))
        i = len(cells)
        cells.append(CellResult(
            index=i, x=float(cx), y=float(cy), box=(x0, y0, x1, y1), area_um2=float(area),
            crop=crop, probabilities=_probs(label, conf), first_label=label, label=label,
            confidence=conf, guided=conf < 0.8, duplicate_of=None, duplicate_reason=None,
            needs_review=conf < 0.6,
        ))
        if kind == "WBC" and i % 4 == 0:
            cells.append(CellResult(
                index=i + 1, x=float(cx) + 3, y=float(cy) + 2, box=(x0 + 3, y0 + 2, x1, y1),
                area_um2=float(area) / 2, crop=crop, probabilities=_probs(label, conf),
                first_label=label, label=label, confidence=conf, guided=False,
                duplicate_of=i, duplicate_reason="lobe of the same cell", needs_review=False,
            ))
    return FieldResult(
        index=index, stage_x=100.0 * index, stage_y=50.0, stage_z=1.5, tile=None,
        um_per_px=BCCD_UM_PER_PX, image=rgb if with_image else None,
        quality={"focus": float(rng.uniform(0.5, 1.0)), "nucleated": len(cells)},
        skipped_reason=None, cells=cells,
    )


def skipped_field(index: int) -> FieldResult:
    return FieldResult(index=index, stage_x=100.0 * index, stage_y=50.0, stage_z=None,
                       tile=None, um_per_px=BCCD_UM_PER_PX, image=None,
                       quality={"focus": 0.1}, skipped_reason="out of focus", cells=[])


def expected_counts(fields: list[FieldResult]) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in fields:
        for c in f.cells:
            if c.duplicate_of is None:
                out[c.label] = out.get(c.label, 0) + 1
    return out


# -- database fixtures: every store test runs on SQLite and on PostgreSQL ------------------

import os  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402

PG_ENV = "MARROWCOUNT_PG_URL"


def _pg_database(base_url: str):
    """Create a fresh database on the server of ``base_url``; returns (url, drop)."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    name = f"mc_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))

    def drop() -> None:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    url = make_url(base_url).set(database=name).render_as_string(hide_password=False)
    return url, drop


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store_url(request, tmp_path):
    """A database URL for an empty store: SQLite in tmp_path, or a fresh PostgreSQL database
    on the server named by $MARROWCOUNT_PG_URL (which .ci/run starts)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    base = os.environ.get(PG_ENV)
    if not base:
        pytest.skip(f"PostgreSQL tests need ${PG_ENV} (set by .ci/run, which starts a server)")
    url, drop = _pg_database(base)
    try:
        yield url
    finally:
        drop()


# -- the daemon as a subprocess, on a virtual slide of real BCCD fields ---------------------

import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from tests.conftest import REPO  # noqa: E402

DAEMON = [sys.executable, "-c", "from daemon.cli import main; main()"]


def bccd_slide_file(folder: Path, cols: int = 5, rows: int = 3, start: int = 40) -> Path:
    """A pyramidal TIFF of real BCCD fields (0.072 µm/px) for the virtual microscope; the
    640×480 camera used below sees exactly one BCCD field per stage position."""
    from drivers.slide_image import write_pyramid
    from tests.slide_fixtures import bccd_mosaic

    path = folder / f"bccd_{cols}x{rows}_{start}.tif"
    if not path.exists():
        write_pyramid(path, bccd_mosaic(cols, rows, start), BCCD_UM_PER_PX)
    return path


def daemon_config(folder: Path, url: str, *, target: int = 1000, metrics_port: int = 0,
                  extra: dict | None = None, **service: object) -> Path:
    """A lab config for a test daemon: its own store, a small sharp virtual camera.

    Focus search and the thin-field gate are off: BCCD blood fields hold a few leukocytes
    each (the gate would skip them as thin) and lie flat; what these tests check is the
    store and the service, on real images through the real pipeline.
    """
    cfg = {
        "store": {"url": url, "data_dir": str(folder / "data")},
        "service": {"poll_seconds": 0.1, "metrics_port": metrics_port, "commit_backoff_s": 0.01,
                    "retry_slide_after_s": 0.0, "log_format": "json", "instrument": "test-scope",
                    **service},
        "acquisition": {
            "target": target,
            "autofocus": {"enabled": False},
            "quality": {"enabled": False},
            "virtual": {"camera_width": 640, "camera_height": 480, "blur_um_per_um": 0.0},
        },
    }
    from daemon.config import _merge

    cfg = _merge(cfg, extra or {})
    path = folder / "lab.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def daemon_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def start_daemon(config: Path, log: Path, *extra: str, env: dict[str, str] | None = None
                 ) -> subprocess.Popen:
    fh = open(log, "ab")
    try:
        return subprocess.Popen([*DAEMON, "daemon", "--config", str(config), *extra], cwd=REPO,
                                stdout=fh, stderr=fh, env=env or daemon_env())
    finally:
        fh.close()


def wait_for_log(log: Path, text: str, proc: subprocess.Popen, timeout: float = 120.0,
                 after: int = 0) -> None:
    """Wait until ``text`` appears in ``log`` beyond byte offset ``after``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if text in log.read_text(errors="replace")[after:]:
            return
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited ({proc.returncode}) before {text!r}:\n"
                                 f"{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no {text!r} in the daemon log after {timeout} s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)


def snapshot(store, slide_id: int = 1) -> dict:
    """What a finished slide is, for comparing two runs: per field its cells' labels."""
    from daemon.models import Cell, Field, Slide
    from sqlalchemy import select

    with store.session() as s:
        slide = s.get(Slide, slide_id)
        fields = {f.id: f.index for f in s.scalars(select(Field).where(Field.slide_id == slide_id))}
        cells = sorted((fields[c.field_id], c.index, c.label, c.duplicate_of)
                       for c in s.scalars(select(Cell).where(Cell.slide_id == slide_id)))
    return {"status": slide.status, "stopped_because": slide.stopped_because,
            "fields": sorted(fields.values()), "cells": cells,
            "counts": store.counts(slide.id), "progress": store.progress(slide.id)}


def stored_files(data: Path) -> set[str]:
    return {str(p.relative_to(data)) for p in (data / "slides").rglob("*") if p.is_file()} \
        if (data / "slides").exists() else set()


def referenced_files(store) -> set[str]:
    from daemon.models import Cell, Field
    from sqlalchemy import select

    with store.session() as s:
        out = {p for p in s.scalars(select(Cell.crop_path)) if p}
        out |= {p for p in s.scalars(select(Field.image_path)) if p}
    return out


def submit(config: Path, *slides: tuple[Path, str]) -> tuple[Any, list[int]]:
    """Queue each ``(slide file, name)`` in the store of lab config ``config``; returns the
    loaded config and the slide ids."""
    from daemon.config import load_config
    from daemon.service import submit_slide
    from daemon.store import Store

    cfg = load_config(config)
    with Store.from_params(cfg.store, cfg.resolve) as store:
        return cfg, [submit_slide(store, cfg, path, name=name) for path, name in slides]


def run_in_process(config: Path, on_event=None, *, stop_after_first_field: bool = False) -> None:
    """Run the daemon of ``config`` in this process until its queue is empty (or, with
    ``stop_after_first_field``, stop as SIGTERM does once a field is committed)."""
    from daemon.config import load_config
    from daemon.service import Service

    holder: list[Any] = []

    def events(e) -> None:
        if stop_after_first_field and e.kind == "field":
            holder[0].request_stop()
        if on_event is not None:
            on_event(e)

    svc = Service(load_config(config), config, on_event=events)
    holder.append(svc)
    try:
        svc.run(exit_when_idle=True)
    finally:
        svc.close()


def webhook_inbox() -> tuple[Any, list[dict]]:
    """A local HTTP server in a thread that keeps every JSON body POSTed to it; shut it down
    with ``server.shutdown()``."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    received: list[dict] = []

    class Inbox(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Inbox)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received
