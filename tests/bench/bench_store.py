"""Store throughput: committing fields with their cells, crops and counts, and the report
query on a store of one million cells. Targets: 100 fields × 50 cells in ≤ 1 s; the report
of one slide on a 1M-cell database in ≤ 200 ms. PostgreSQL too when $MARROWCOUNT_PG_URL is set.
"""

from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from sqlalchemy import insert

from daemon.config import load_config
from daemon.models import Cell, Count, Field, Slide
from daemon.report import build_report
from daemon.store import Store
from pipeline.stats import proportion_ci
from tests.daemon_fixtures import PBC11, make_field

N_FIELDS, N_CELLS = 100, 50
BIG_CELLS, CELLS_PER_SLIDE, CELLS_PER_FIELD = 1_000_000, 500, 50


def _fields(with_image: bool, with_crops: bool = True) -> list:
    """100 fields of 50 real cells each (crops from real PBC cells and BCCD fields)."""
    out = []
    for i in range(N_FIELDS):
        f = make_field(i, seed=1, with_image=with_image)
        cells = list(f.cells)
        while len(cells) < N_CELLS:  # BCCD fields hold ~20 annotated cells: repeat them
            c = cells[len(cells) % len(f.cells)]
            cells.append(replace(c, index=len(cells), duplicate_of=None))
        if not with_crops:
            cells = [replace(c, crop=None) for c in cells]
        out.append(replace(f, cells=cells[:N_CELLS]))
    return out


def bench_commit(url: str, data: Path, label: str, with_image: bool,
                 with_crops: bool = True) -> None:
    fields = _fields(with_image, with_crops)
    with Store(url, data, save_field_images=with_image) as store:
        sid = store.create_slide("bench", "virtual", "bench", 10**6, "pbc11")
        t0, c0 = time.perf_counter(), time.process_time()
        for f in fields:
            store.commit_field(sid, f)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert store.progress(sid).n_fields == N_FIELDS
    what = ("rows + counts, + 5000 PNG crops + 100 field PNGs" if with_image else
            "rows + counts, + 5000 PNG crops" if with_crops else "rows + counts only")
    # CPU time (all threads) beside wall time: on a shared, loaded machine wall time mostly
    # measures waiting for a core.
    print(f"   {label}: commit {N_FIELDS} fields × {N_CELLS} cells ({what}): {dt:.2f} s wall, "
          f"{cpu:.2f} s CPU ({N_FIELDS / dt:.0f} fields/s, {N_FIELDS * N_CELLS / dt:.0f} cells/s)"
          f"{'' if with_image else '  [target ≤ 1 s]'}", flush=True)


def _fill_big(store: Store) -> list[int]:
    """Bulk-insert slides of 500 cells until the store holds 1M cells; returns slide ids."""
    rng = random.Random(0)
    n_slides = BIG_CELLS // CELLS_PER_SLIDE
    fields_per_slide = CELLS_PER_SLIDE // CELLS_PER_FIELD
    probs_template = {c: 0.0 for c in PBC11 + ("non_leukocyte",)}
    with store.engine.begin() as conn:
        conn.execute(insert(Slide), [
            {"id": s + 1, "name": f"big-{s}", "source": "virtual", "source_ref": "", "target": 500,
             "taxonomy": "pbc11", "status": "awaiting_review"} for s in range(n_slides)])
        conn.execute(insert(Field), [
            {"id": s * fields_per_slide + k + 1, "slide_id": s + 1, "index": k, "um_per_px": 0.1,
             "n_counted": CELLS_PER_FIELD}
            for s in range(n_slides) for k in range(fields_per_slide)])
        counts = []
        batch = []
        for s in range(n_slides):
            per: dict[str, int] = {}
            for k in range(fields_per_slide):
                fid = s * fields_per_slide + k + 1
                for c in range(CELLS_PER_FIELD):
                    label = PBC11[rng.randrange(len(PBC11))]
                    per[label] = per.get(label, 0) + 1
                    probs = dict(probs_template)
                    probs[label] = 0.9
                    batch.append({
                        "field_id": fid, "slide_id": s + 1, "index": c, "x": 10.0 * c,
                        "y": 5.0 * k, "box": [0, 0, 10, 10], "crop_path": f"slides/{s}/c{c}.png",
                        "probabilities": probs, "first_label": label, "label": label,
                        "confidence": 0.9, "guided": False, "needs_review": c % 7 == 0,
                        "excluded": False})
            counts += [{"slide_id": s + 1, "class_name": k, "n": v} for k, v in per.items()]
            if len(batch) >= 50_000:
                conn.execute(insert(Cell), batch)
                batch = []
        if batch:
            conn.execute(insert(Cell), batch)
        conn.execute(insert(Count), counts)
    return list(range(1, n_slides + 1))


def bench_report(url: str, data: Path, label: str) -> None:
    cfg = load_config()
    with Store(url, data) as store:
        t0 = time.perf_counter()
        slides = _fill_big(store)
        build = time.perf_counter() - t0
        rng = random.Random(1)
        times = []
        for sid in rng.sample(slides, 20):
            proportion_ci.cache_clear()  # cold: no interval computed for an earlier slide
            t = time.perf_counter()
            rep = build_report(store, sid, cfg)
            times.append(time.perf_counter() - t)
            assert rep["machine_differential"]["total"] == CELLS_PER_SLIDE
        # A signed slide's report also aggregates its reviewed cells.
        store.set_status(slides[0], "signed")
        proportion_ci.cache_clear()
        t = time.perf_counter()
        build_report(store, slides[0], cfg)
        signed = time.perf_counter() - t
        queue_ms, search_ms = _bench_queue(store, cfg, slides)
    print(f"   {label}: built a {BIG_CELLS:,}-cell store in {build:.1f} s; report query: "
          f"median {1000 * statistics.median(times):.0f} ms, max {1000 * max(times):.0f} ms "
          f"(20 slides), signed slide {1000 * signed:.0f} ms  [target ≤ 200 ms]", flush=True)
    print(f"   {label}: review queue over the same store (20 open slides, {len(slides) - 20:,} "
          f"signed; in-process ASGI): median {queue_ms:.0f} ms; search of every slide's name "
          f"and case: median {search_ms:.0f} ms", flush=True)


def _bench_queue(store: Store, cfg, slides: list[int]) -> tuple[float, float]:
    """Median ms of the queue's JSON (polled every few seconds by each open queue page) and
    of a search, with all but 20 slides signed: years of a lab's slides in one store."""
    from datetime import datetime, timedelta, timezone

    from fastapi.testclient import TestClient
    from sqlalchemy import update

    from daemon.review.app import create_app
    from daemon.review.auth import create_user
    from tests.review_slide import login

    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    with store.session() as s:
        for i, sid in enumerate(slides[20:]):
            s.execute(update(Slide).where(Slide.id == sid).values(
                status="signed", signed_by="bench", signed_at=t0 + timedelta(hours=i),
                case_info={"accession": f"BM{sid:06d}", "patient_id": None,
                           "patient_name": None, "specimen": None, "collected_on": None}))
        create_user(s, "bench", "bench-password-1", "technician")
    client = TestClient(create_app(cfg, store))
    login(client, ("bench", "bench-password-1"))

    def ms(params: dict) -> float:
        times = []
        for _ in range(7):
            t = time.perf_counter()
            r = client.get("/api/queue", params=params)
            times.append(1000 * (time.perf_counter() - t))
            assert r.status_code == 200
        return statistics.median(times)

    return ms({}), ms({"q": f"BM{slides[25]:06d}"})


def main() -> None:
    pg = os.environ.get("MARROWCOUNT_PG_URL")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        bench_commit(f"sqlite:///{t / 'r.db'}", t / "r", "SQLite", False, with_crops=False)
        bench_commit(f"sqlite:///{t / 'c.db'}", t / "c", "SQLite", with_image=False)
        bench_commit(f"sqlite:///{t / 'i.db'}", t / "i", "SQLite", with_image=True)
        if pg:
            from tests.daemon_fixtures import _pg_database

            url, drop = _pg_database(pg)
            try:
                bench_commit(url, t / "p", "PostgreSQL", False, with_crops=False)
            finally:
                drop()
            url, drop = _pg_database(pg)
            try:
                bench_commit(url, t / "p2", "PostgreSQL", with_image=False)
            finally:
                drop()
        bench_report(f"sqlite:///{t / 'big.db'}", t / "b", "SQLite")
        if pg:
            url, drop = _pg_database(pg)
            try:
                bench_report(url, t / "pb", "PostgreSQL")
            finally:
                drop()
    if not pg:
        print("   (PostgreSQL figures need $MARROWCOUNT_PG_URL)")


if __name__ == "__main__":
    main()
