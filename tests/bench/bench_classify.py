"""Classifier speed: model load (cold process and warm), per-cell time at batch 32 and 1 for
the inference variants (fp32 eager, bf16 + channels_last, TorchScript freeze, int8), and the
full ``Classifier.classify`` call (pre-processing, dual stage and unknown score included) at
each configurable precision.

Targets (issue 3): <= 2 ms per cell at batch 32, <= 10 ms at batch 1, load <= 0.3 s."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import torch

from tests.conftest import REPO

CKPT = REPO / "pipeline" / "models" / "default.pt"
COLD = f"""
import time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from pipeline.classify import load_classifier
t2 = time.perf_counter()
clf = load_classifier({str(CKPT)!r})
t3 = time.perf_counter()
print(f"{{t1 - t0:.3f}} {{t2 - t1:.3f}} {{t3 - t2:.3f}}")
"""


def _time(fn, n: int) -> float:
    fn()
    fn()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t0) / n)
    return best


def main() -> None:
    from pipeline.classify import Classifier, load_classifier, read_checkpoint

    torch.set_num_threads(2)
    out = subprocess.run([sys.executable, "-c", COLD], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.split()
    print(f"   cold process: import torch {float(out[0]) * 1e3:.0f} ms, import pipeline.classify "
          f"{float(out[1]) * 1e3:.0f} ms, load_classifier {float(out[2]) * 1e3:.0f} ms")
    t0 = time.perf_counter()
    clf = load_classifier(CKPT)
    print(f"   warm load_classifier: {(time.perf_counter() - t0) * 1e3:.0f} ms "
          f"({CKPT.stat().st_size / 1e6:.1f} MB, precision {clf.precision} "
          f"{clf.precision_note})")
    clfs = {"int8": clf, "bf16": Classifier(read_checkpoint(CKPT), CKPT, precision="bf16")}
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 255, (32, 96, 96, 3), dtype=np.uint8)
    model = clfs["bf16"].model
    for bs in (32, 1):
        x = clf._prep(crops[:bs])
        variants = {}

        def fp32(x=x):
            with torch.inference_mode():
                model(x)

        def bf16(x=x):
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)

        variants["fp32 eager"] = fp32
        variants["bf16 channels_last"] = bf16
        with torch.inference_mode():
            frozen = torch.jit.freeze(torch.jit.trace(model, x))

        def jit(x=x):
            with torch.inference_mode():
                frozen(x)

        variants["torchscript freeze fp32"] = jit

        def int8(x=x):
            with torch.inference_mode():
                clf.model(x)

        if clf.precision == "int8":
            variants["int8 (x86 engine)"] = int8
        for name, fn in variants.items():
            per = _time(fn, max(3, 64 // bs)) / bs
            print(f"   batch {bs:2d} {name:24s} {per * 1e3:6.2f} ms/cell")
        for name, c in clfs.items():
            per = _time(lambda c=c: c.classify(crops[:bs]), max(3, 64 // bs)) / bs
            print(f"   batch {bs:2d} {'Classifier.classify ' + name:24s} {per * 1e3:6.2f} ms/cell "
                  f"(full call)")


if __name__ == "__main__":
    main()
