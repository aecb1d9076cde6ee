"""Scanner-folder path figures: slide reading speed, watcher throughput, and (when the shipped
classifier exists) the differential of a virtual slide dropped into a watched folder.

``python -m tests.bench folder`` prints them. The virtual slide (seed 7, or
``MARROWCOUNT_BENCH_SEED``) is built once with slidegen and cached under var/bench/ (ignored
by git), named by seed and by a digest of the generator's code and parameters.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from tests.conftest import BCCD_UM_PER_PX, REPO, WSI

CACHE = REPO / "var" / "bench"


def _timed(fn, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1000


def read_speed() -> None:
    from drivers.slide_image import open_slide, write_pyramid
    from tests.slide_fixtures import bccd_mosaic

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_pyramid(Path(tmp) / "v.tif", bccd_mosaic(8, 6), BCCD_UM_PER_PX)
        cases = [("tifffile JPEG pyramid 5120x2880", path),
                 ("OpenSlide NDPI 3968x4864", WSI / "test3-DAPI-2.ndpi"),
                 ("OpenSlide SVS 2220x2967", WSI / "CMU-1-Small-Region.svs")]
        for label, p in cases:
            with open_slide(p) as s:
                w, h = min(1388, s.width), min(1040, s.height)

                def rand() -> None:
                    s.read_region(int(rng.integers(0, s.width - w + 1)),
                                  int(rng.integers(0, s.height - h + 1)), w, h)

                def same() -> None:
                    s.read_region(0, 0, w, h)

                print(f"   read_region {w}x{h}, {label}: random {_timed(rand, 20):.1f} ms, "
                      f"repeated {_timed(same, 20):.1f} ms")
                print(f"   read_overview(1024), {label}: {_timed(lambda: s.read_overview(1024), 3):.0f} ms")


def watcher_throughput() -> None:
    from daemon.config import load_config
    from daemon.store import Store
    from drivers.folder import FolderWatcher, WatchParams
    from tests.slide_fixtures import bccd_field

    cfg = load_config()
    with tempfile.TemporaryDirectory() as tmp:
        inbox = Path(tmp) / "in"
        inbox.mkdir()
        for i in range(50):
            shutil.copy(bccd_field(i), inbox / f"f{i:02d}.jpg")
        shutil.copy(WSI / "test3-DAPI-2.ndpi", inbox / "ndpi.ndpi")
        store = Store(f"sqlite:///{tmp}/s.db", Path(tmp) / "data")
        params = WatchParams(**{**cfg.watch.model_dump(), "stable_seconds": 0.0,
                                "folders": [{"path": str(inbox), "um_per_px": BCCD_UM_PER_PX}]})
        w = FolderWatcher(params, store, target=500, taxonomy=cfg.taxonomy, detect=cfg.detect)
        t0 = time.perf_counter()
        w.scan_once()  # first look
        n = sum(e.kind == "slide" for e in w.scan_once())
        dt = time.perf_counter() - t0
        print(f"   watcher: {n} slides (50 JPEG fields + 1 NDPI) hashed, opened, planned and "
              f"queued in {dt:.2f} s ({n / dt:.0f} slides/s)")
        store.close()


def virtual_slide_differential() -> None:
    """Count a virtual slide (slidegen) dropped into a watched folder; compare with its truth."""
    from daemon.config import load_config
    from daemon.service import Service
    from drivers import slidegen
    from drivers.folder import FolderWatcher, WatchParams

    cfg = load_config()
    ckpt = cfg.resolve(cfg.classifier.checkpoint)
    if not ckpt.is_file():
        print(f"   differential: skipped, no classifier at {ckpt}")
        return
    # Another slide of the same recipe: MARROWCOUNT_BENCH_SEED (each is cached once built).
    seed = int(os.environ.get("MARROWCOUNT_BENCH_SEED", "7"))
    # Keyed by the generator's code and parameters too, so a changed recipe is never scored
    # on a slide the old one built.
    recipe = hashlib.sha1(Path(slidegen.__file__).read_bytes()
                          + cfg.slidegen.model_dump_json().encode()).hexdigest()[:10]
    tif = CACHE / f"virtual-{seed}-{recipe}.tif"
    truth_path = tif.with_suffix(".json")
    if not tif.is_file():
        CACHE.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        slidegen.write_slide(slidegen.build_slide(cfg.slidegen, seed), tif, truth_path,
                             cfg.slidegen)
        print(f"   built virtual slide seed {seed} in {time.perf_counter() - t0:.0f} s")
    truth = slidegen.read_truth(truth_path)
    target = cfg.acquisition.target
    with tempfile.TemporaryDirectory() as tmp:
        inbox = Path(tmp) / "scanner"
        inbox.mkdir()
        os.link(tif, inbox / tif.name) if os.stat(tif).st_dev == os.stat(tmp).st_dev else \
            shutil.copy(tif, inbox / tif.name)
        store_cfg = cfg.store.model_copy(update={"url": f"sqlite:///{tmp}/s.db",
                                                 "data_dir": f"{tmp}/data"})
        run_cfg = cfg.model_copy(update={"store": store_cfg, "service": cfg.service.model_copy(
            update={"metrics_port": 0})})
        svc = Service(run_cfg)
        params = WatchParams(**{**cfg.watch.model_dump(), "stable_seconds": 0.0,
                                "folders": [{"path": str(inbox)}]})
        w = FolderWatcher(params, svc.store, target=target, taxonomy=cfg.taxonomy,
                          detect=cfg.detect)
        w.scan_once()
        (slide_ev,) = [e for e in w.scan_once() if e.kind == "slide"]
        t0 = time.perf_counter()
        svc.run(exit_when_idle=True)
        dt = time.perf_counter() - t0
        slide = svc.store.slide(slide_ev.slide_id)
        counts = svc.store.counts(slide.id)
        fields = svc.store.fields(slide.id)
        svc.close()
    counted = {c: n for c, n in counts.items() if c != "non_leukocyte"}
    total = sum(counted.values())
    # Truth over the whole slide and over the fields that were counted.
    tiles = [tuple(int(v) for v in f.tile.split("#")[1].split(",")) for f in fields
             if f.skipped_reason is None]
    # The detector leaves out cells cut by a field's edge: compare with the cells wholly inside.
    in_fields = [c for c in truth["cells"]
                 if any(x <= c["box"][0] and c["box"][2] <= x + w and y <= c["box"][1]
                        and c["box"][3] <= y + h for x, y, w, h in tiles)]
    whole = _shares([c["class"] for c in truth["cells"]])
    local = _shares([c["class"] for c in in_fields])
    got = {c: 100.0 * n / total for c, n in counted.items()} if total else {}
    print(f"   differential (virtual slide seed {seed}, target {target}): {slide.stopped_because}, "
          f"{total} counted in {len(fields)} fields ({len(tiles)} counted), {dt:.0f} s; the truth "
          f"has {len(in_fields)} leukocytes wholly inside those fields")
    worst_w = worst_l = 0.0
    for c in sorted(set(whole) | set(got)):
        dw, dl = got.get(c, 0.0) - whole.get(c, 0.0), got.get(c, 0.0) - local.get(c, 0.0)
        worst_w, worst_l = max(worst_w, abs(dw)), max(worst_l, abs(dl))
        print(f"     {c:22s} counted {got.get(c, 0):5.1f}%  truth(slide) {whole.get(c, 0):5.1f}%"
              f"  truth(counted fields) {local.get(c, 0):5.1f}%  diff {dl:+6.2f} pp")
    print(f"   worst class error: {worst_l:.2f} pp vs counted-field truth, {worst_w:.2f} pp vs "
          f"whole-slide truth (acceptance: within 3 pp)")


def _shares(labels: list[str]) -> dict[str, float]:
    n = len(labels)
    out: dict[str, float] = {}
    for lab in labels:
        out[lab] = out.get(lab, 0.0) + 100.0 / n
    return out


def main() -> None:
    read_speed()
    watcher_throughput()
    virtual_slide_differential()


if __name__ == "__main__":
    main()
