"""Run every ``tests/bench/bench_*.py`` module's ``main()`` in turn and print its figures."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time

import tests.bench as bench_pkg


def main(argv: list[str]) -> int:
    wanted = set(argv)
    names = sorted(
        m.name for m in pkgutil.iter_modules(bench_pkg.__path__) if m.name.startswith("bench_")
    )
    failed = 0
    for name in names:
        if wanted and name.removeprefix("bench_") not in wanted:
            continue
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            importlib.import_module(f"tests.bench.{name}").main()
        except Exception as exc:  # one failing bench must not hide the others' figures
            failed += 1
            print(f"   FAILED: {type(exc).__name__}: {exc}", flush=True)
        print(f"   ({time.perf_counter() - t0:.1f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
