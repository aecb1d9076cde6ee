"""Differential statistics on counts drawn from the real expert-labelled PBC manifest."""

from __future__ import annotations

import csv
import math
import re
from collections import Counter

import pytest
from scipy.stats import beta

from pipeline.stats import StatsParams, adaptive_stop_reason, differential, proportion_ci
from tests.conftest import PBC


def _params(config, **kw) -> StatsParams:
    return config.stats.model_copy(update=kw)


def _pbc_counts(n: int, step: int = 29) -> dict[str, int]:
    """Labels of ``n`` real PBC cells, taken every ``step`` rows of the manifest."""
    with open(PBC / "manifest.csv", newline="") as fh:
        labels = [r["label"] for r in csv.DictReader(fh)]
    keep = {"promyelocyte", "myelocyte", "metamyelocyte", "band_neutrophil",
            "segmented_neutrophil", "eosinophil", "basophil", "monocyte", "erythroblast",
            "lymphocyte", "platelet"}
    picked = [lab for lab in labels[::step] if lab in keep][:n]
    # Platelets are not leukocytes: the analysis calls them non_leukocyte.
    return dict(Counter("non_leukocyte" if lab == "platelet" else lab for lab in picked))


def _cp(k: int, n: int, conf: float = 0.95) -> tuple[float, float]:
    """Clopper–Pearson from its beta-quantile definition, independent of binomtest."""
    a = 1 - conf
    lo = 0.0 if k == 0 else beta.ppf(a / 2, k, n - k + 1)
    hi = 1.0 if k == n else beta.ppf(1 - a / 2, k + 1, n - k)
    return lo, hi


def test_intervals_percentages_and_me_ratio(config):
    counts = _pbc_counts(500)
    tax = config.classes
    d = differential(counts, tax, config.stats)
    counted = {k: v for k, v in counts.items() if k != "non_leukocyte"}
    assert d.total == sum(counted.values())
    assert d.not_counted == {"non_leukocyte": counts["non_leukocyte"]}
    assert sum(r.pct for r in d.rows) == pytest.approx(100.0)
    for r in d.rows:
        assert r.n == counted.get(r.name, 0)
        lo, hi = _cp(r.n, d.total)
        assert (r.ci_low_pct, r.ci_high_pct) == pytest.approx((100 * lo, 100 * hi), abs=1e-6)
        assert r.ci_low_pct <= r.pct <= r.ci_high_pct
    # M:E is granulocytes and their precursors against erythroid precursors: monocytes and
    # lymphocytes are in neither side (ICSH).
    granulocytic = {"promyelocyte", "myelocyte", "metamyelocyte", "band_neutrophil",
                    "segmented_neutrophil", "eosinophil", "basophil"}
    assert {c.name for c in tax.classes if c.lineage == "myeloid"} == granulocytic
    myeloid = sum(v for k, v in counted.items() if k in granulocytic)
    assert counted["monocyte"] > 0 and d.myeloid == myeloid and d.erythroid == counted["erythroblast"]
    assert d.me_ratio == pytest.approx(myeloid / counted["erythroblast"])
    lo, hi = d.me_ci
    assert lo < d.me_ratio < hi
    plo, phi = _cp(myeloid, myeloid + d.erythroid)
    assert lo == pytest.approx(plo / (1 - plo)) and hi == pytest.approx(phi / (1 - phi))
    # pbc11 has no blast class: no blast % is reported rather than a misleading 0%.
    assert d.blast_pct is None and d.flags == ()


def test_zero_count_interval_is_the_exact_rule_of_three():
    lo, hi = proportion_ci(0, 500)
    assert lo == 0.0
    assert hi == pytest.approx(1 - 0.025 ** (1 / 500))  # exact upper bound for k = 0


def test_blast_flags_when_interval_straddles_threshold(config):
    seed10 = config.model_copy(update={"taxonomy": "seed10"}).classes
    base = {"promyelocyte": 40, "myelocyte": 90, "metamyelocyte": 80, "band_neutrophil": 60,
            "segmented_neutrophil": 70, "polychromatic_normoblast": 80,
            "orthochromatic_normoblast": 50, "non_leukocyte": 37}
    d = differential({**base, "myeloblast": 30}, seed10, config.stats)
    assert d.total == 500 and d.blast_n == 30 and d.blast_pct == pytest.approx(6.0)
    assert d.blast_ci_pct[0] < 5.0 < d.blast_ci_pct[1]
    assert [f.threshold_pct for f in d.flags] == [5.0]
    assert "straddles 5%" in d.flags[0].message
    # Few blasts in a big count: the interval sits below 5% and decides every threshold.
    big = {k: v * 4 for k, v in base.items()}
    d2 = differential({**big, "myeloblast": 10}, seed10, config.stats)
    assert d2.blast_ci_pct[1] < 5.0 and d2.decisive
    # No erythroid cell: M:E is undefined, not infinite.
    d3 = differential({"myeloblast": 3, "myelocyte": 10}, seed10, config.stats)
    assert d3.me_ratio is None and d3.me_ci is None


def test_adaptive_stop_only_when_decisive(config):
    seed10 = config.model_copy(update={"taxonomy": "seed10"}).classes
    on = _params(config, adaptive_stop=True, adaptive_min_cells=200)
    clear = {"myelocyte": 150, "segmented_neutrophil": 100, "polychromatic_normoblast": 60,
             "myeloblast": 2}
    assert adaptive_stop_reason(clear, seed10, config.stats) is None  # switched off
    reason = adaptive_stop_reason(clear, seed10, on)
    assert reason and reason.startswith("adaptive stop at 312 cells")
    near = {**clear, "myeloblast": 16}  # ~5%: straddles
    assert adaptive_stop_reason(near, seed10, on) is None
    few = {"myelocyte": 50, "myeloblast": 1}
    assert adaptive_stop_reason(few, seed10, on) is None  # below adaptive_min_cells


def test_confidence_level_widens_intervals(config):
    counts = _pbc_counts(300)
    d95 = differential(counts, config.classes, config.stats)
    d99 = differential(counts, config.classes, _params(config, confidence=0.99))
    for a, b in zip(d95.rows, d99.rows):
        assert b.ci_low_pct <= a.ci_low_pct and b.ci_high_pct >= a.ci_high_pct
        assert not math.isnan(a.ci_low_pct)


def test_reference_intervals_mark_values_below_and_above(config):
    counts = _pbc_counts(500)
    plain = differential(counts, config.classes, config.stats)
    assert all(r.reference is None and r.outside is None for r in plain.rows)
    assert plain.me_reference is None and plain.me_outside is None
    eos, lym, mono = (plain.row(n) for n in ("eosinophil", "lymphocyte", "monocyte"))
    shown = round(mono.pct, 2)  # an interval ending at the recorded value holds it
    refs = {"eosinophil": (0.0, eos.pct - 1), "lymphocyte": (lym.pct + 1, 100.0),
            "monocyte": (shown - 1, shown), "me_ratio": (0.1, plain.me_ratio / 2)}
    d = differential(counts, config.classes, _params(config, reference_intervals=refs))
    assert d.row("eosinophil").outside == "H" and d.row("lymphocyte").outside == "L"
    assert d.row("monocyte").outside is None and d.row("monocyte").reference == refs["monocyte"]
    assert d.row("basophil").reference is None and d.row("basophil").outside is None
    assert d.me_reference == refs["me_ratio"] and d.me_outside == "H"
    # The same numbers otherwise: intervals only annotate.
    assert [(r.n, r.pct, r.ci_low_pct) for r in d.rows] == \
        [(r.n, r.pct, r.ci_low_pct) for r in plain.rows]
    # Nothing counted: no value, so nothing is outside.
    empty = differential({"non_leukocyte": 4}, config.classes,
                         _params(config, reference_intervals=refs))
    assert all(r.outside is None for r in empty.rows) and empty.me_outside is None


@pytest.mark.parametrize("intervals, field", [
    ({"myeloblastt": [0, 5]}, "stats.reference_intervals: ['myeloblastt'] is not a class"),
    ({"myeloblast": [5, 1]}, "reference_intervals.myeloblast: [5, 1] must satisfy"),
    ({"lymphocyte": [10, 120]}, "reference_intervals.lymphocyte: [10, 120] must satisfy"),
])
def test_bad_reference_intervals_are_refused_by_name(intervals, field):
    from daemon.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=re.escape(field)):
        load_config(overrides={"stats": {"reference_intervals": intervals}})
    # Any taxonomy's class is allowed (a store holds slides of several), and M:E above 100.
    cfg = load_config(overrides={"stats": {"reference_intervals": {
        "myeloblast": [0, 5], "erythroblast": [15, 35], "me_ratio": [2, 400]}}})
    assert cfg.stats.reference_intervals["me_ratio"] == (2.0, 400.0)
