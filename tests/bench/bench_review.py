"""Review app speed: the slide page with 500 cells, and a reclassification round trip.

Targets (issue 8): the slide page renders in ≤ 300 ms server-side; a reclassification
round-trips in ≤ 100 ms. The slide holds real pipeline output (BCCD fields through
analyze_field), its fields committed again until it holds 500 cells.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

N_CELLS = 500


def _median_ms(fn, n: int) -> tuple[float, float, float]:
    """Median and p90 wall time, and median CPU time of this process (all its threads), in ms.

    On a shared, oversubscribed machine the wall time includes waiting for a core; the CPU
    time is what the request itself costs.
    """
    times, cpu = [], []
    for i in range(n):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(i)
        times.append(1000 * (time.perf_counter() - t0))
        cpu.append(1000 * (time.process_time() - c0))
    times.sort()
    return statistics.median(times), times[int(0.9 * (len(times) - 1))], statistics.median(cpu)


def main() -> None:
    import httpx
    import uvicorn
    from fastapi.testclient import TestClient
    from sqlalchemy import func, select

    from daemon.config import load_config
    from daemon.models import Cell
    from daemon.review.app import create_app
    from daemon.review.auth import SESSION_COOKIE
    from daemon.store import Store
    from pipeline.stats import differential
    from tests.review_slide import TECH, add_users, analyzed_fields, bccd_fields, count_slide, login

    cfg = load_config()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = Store(f"sqlite:///{root / 'store.db'}", root / "data")
        add_users(store)
        t0 = time.perf_counter()
        fields = analyzed_fields(cfg, bccd_fields(16))
        sid = count_slide(store, cfg, "bench", fields, min_cells=N_CELLS)
        with store.session() as s:
            n = s.scalar(select(func.count()).where(Cell.slide_id == sid))
            ids = list(s.scalars(select(Cell.id).where(Cell.slide_id == sid,
                                                       Cell.duplicate_of.is_(None)).limit(50)))
        print(f"   slide: {n} cells in {len(fields)} distinct real fields "
              f"(built in {time.perf_counter() - t0:.1f} s)")
        app = create_app(cfg, store)
        client = TestClient(app)
        token = login(client, TECH)
        client.headers["X-CSRF-Token"] = token
        labels = ("monocyte", "lymphocyte")

        def page(_i: int) -> None:
            assert client.get(f"/slides/{sid}").status_code == 200

        def move(i: int) -> None:
            r = client.post(f"/api/slides/{sid}/reclassify",
                            json={"cells": [ids[i % len(ids)]], "label": labels[i % 2]})
            assert r.status_code == 200

        page(0)
        med, p90, cpu = _median_ms(page, 20)
        size = len(client.get(f"/slides/{sid}").content) / 1024
        print(f"   slide page, {n} cells, server-side (in-process ASGI): median {med:.0f} ms, "
              f"p90 {p90:.0f} ms, CPU {cpu:.0f} ms, {size:.0f} KiB  (target ≤ 300 ms)")
        med, p90, cpu = _median_ms(move, 40)
        print(f"   reclassify 1 cell + audit + new differential (in-process): median {med:.1f} ms, "
              f"p90 {p90:.1f} ms, CPU {cpu:.1f} ms  (target ≤ 100 ms)")
        c = {k: v for k, v in client.get(f"/api/slides/{sid}").json()["machine_counts"].items()}
        med, p90, cpu = _median_ms(lambda _i: differential(c, cfg.classes, cfg.stats), 20)
        print(f"     of which pipeline.stats.differential alone: median {med:.1f} ms, "
              f"CPU {cpu:.1f} ms")

        # The same over a real socket: uvicorn on 127.0.0.1, httpx keep-alive client.
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        port = server.servers[0].sockets[0].getsockname()[1]
        cookie = {SESSION_COOKIE: client.cookies.get(SESSION_COOKIE)}
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", cookies=cookie,
                          headers={"X-CSRF-Token": token}) as http:
            def move_http(i: int) -> None:
                r = http.post(f"/api/slides/{sid}/reclassify",
                              json={"cells": [ids[i % len(ids)]], "label": labels[i % 2]})
                assert r.status_code == 200, r.text

            move_http(0)
            med, p90, cpu = _median_ms(move_http, 40)
            print(f"   reclassify round trip over HTTP (uvicorn, 127.0.0.1): median {med:.1f} ms, "
                  f"p90 {p90:.1f} ms, CPU {cpu:.1f} ms  (target ≤ 100 ms)")
        server.should_exit = True
        thread.join(10)
        store.close()


if __name__ == "__main__":
    main()
