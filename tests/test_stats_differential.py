"""Differential statistics on counts drawn from the real expert-labelled PBC manifest."""

from __future__ import annotations

import csv
import math
import re
from collections import Counter

import pytest
from scipy.stats import beta

from pipeline.stats import (
    StatsParams,
    adaptive_stop_reason,
    confidence_text,
    differential,
    interval_text,
    proportion_ci,
    value_text,
)
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
    granulocytic = {"myeloblast", "promyelocyte", "myelocyte", "metamyelocyte",
                    "band_neutrophil", "segmented_neutrophil", "eosinophil", "basophil"}
    assert {c.name for c in tax.classes if c.lineage == "myeloid"} == granulocytic
    assert set(d.myeloid_classes) == granulocytic and d.erythroid_classes == ("erythroblast",)
    myeloid = sum(v for k, v in counted.items() if k in granulocytic)
    assert counted["monocyte"] > 0 and d.myeloid == myeloid and d.erythroid == counted["erythroblast"]
    assert d.me_ratio == pytest.approx(myeloid / counted["erythroblast"])
    lo, hi = d.me_ci
    assert lo < d.me_ratio < hi
    plo, phi = _cp(myeloid, myeloid + d.erythroid)
    assert lo == pytest.approx(plo / (1 - plo)) and hi == pytest.approx(phi / (1 - phi))
    # pbc11's blasts are named only by a reviewer: the machine's count gives no blast %
    # rather than a misleading 0%; reviewed counts with none named give 0%.
    assert d.blast_reviewer_only and d.blast_pct == 0.0 and d.flags == ()
    m = differential(counts, tax, config.stats, machine=True)
    assert m.blast_pct is None and m.blast_ci_pct is None and m.blast_reviewer_only
    # No row for a class the machine cannot count: its 0% would be no observation.
    assert m.not_reported == ("myeloblast", "plasma_cell", "other_nucleated")
    assert [(r.name, r.pct) for r in m.rows] == [(r.name, r.pct) for r in d.rows
                                                 if not r.reviewer_only]


def test_a_reviewer_only_class_counts_in_the_denominator(config):
    """A blast the model cannot name, put right by a reviewer, lowers every other share: left
    out instead, it would have raised them (90 of 500, not 90 of 400)."""
    tax = config.classes
    assert "myeloblast" not in tax.model_names and "myeloblast" in tax.names
    counts = {"myeloblast": 90, "lymphocyte": 100, "segmented_neutrophil": 250,
              "erythroblast": 60, "non_leukocyte": 7}
    d = differential(counts, tax, config.stats)
    assert d.total == 500 and d.blast_n == 90 and d.blast_pct == pytest.approx(18.0)
    lo, hi = _cp(90, 500)
    assert d.blast_ci_pct == pytest.approx((100 * lo, 100 * hi), abs=1e-6)
    assert d.row("myeloblast").reviewer_only and not d.row("lymphocyte").reviewer_only
    assert d.myeloid == 340  # blasts are myeloid precursors in M:E


def test_display_rounds_intervals_outward_and_marks_agree(config):
    # 4 of 200: the upper bound is 5.04%, so the interval must not read as ending at 5.0.
    lo, hi = proportion_ci(4, 200)
    assert 5.0 < 100 * hi < 5.05 and interval_text(100 * lo, 100 * hi, 1).endswith("5.1")
    lo, hi = proportion_ci(52, 201)
    assert 19.95 < 100 * lo < 20.0 and interval_text(100 * lo, 100 * hi, 1).startswith("19.9")
    lo, hi = proportion_ci(0, 500)
    assert interval_text(100 * lo, 100 * hi, 1) == "0.0–0.8"
    assert interval_text(20.0, 30.0, 1) == "20.0–30.0"  # exact bounds are not widened
    # 25 of 497 lymphocytes = 5.03% against 0-5: "5.0 H" would contradict itself.
    d = differential({"lymphocyte": 25, "segmented_neutrophil": 472}, config.classes,
                     _params(config, reference_intervals={"lymphocyte": (0.0, 5.0)}))
    r = d.row("lymphocyte")
    assert r.outside == "H" and value_text(r.pct, 1, r.outside, r.reference, 2) == "5.03"
    assert value_text(12.345, 1, None, (0.0, 5.0), 2) == "12.3"


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
    # No erythroid cell: M:E is infinite (no number), with an exact lower bound, and above
    # any reference interval.
    d3 = differential({"myeloblast": 3, "myelocyte": 10}, seed10,
                      _params(config, reference_intervals={"me_ratio": (2.0, 4.0)}))
    plo, _ = _cp(13, 13)
    assert d3.me_ratio is None and d3.me_ci == pytest.approx((plo / (1 - plo), math.inf))
    assert d3.me_outside == "H" and value_text(d3.me_ratio, 2, missing="∞") == "∞"
    assert differential({"lymphocyte": 5}, seed10, config.stats).me_ci is None


def test_values_for_people_round_a_half_up():
    """1 of 400 cells is 0.25%: "0.3" as on paper (Python's own format gave "0.2"); M:E 9:8."""
    assert value_text(100 * 1 / 400, 1) == "0.3" and value_text(9 / 8, 2) == "1.13"
    assert value_text(100 * 6 / 13, 1) == "46.2" and value_text(-0.0, 1) == "0.0"
    assert confidence_text(0.975) == "97.5%" and confidence_text(0.95) == "95%"


def test_no_counted_cell_gives_no_percentages(config):
    """0 of 0 is no observation: a slide with only non-leukocytes has no class at 0.0% (a LIS
    reading the value column imported thirteen zero results) and no 0-100% interval."""
    d = differential({"non_leukocyte": 40}, config.classes, config.stats)
    assert d.total == 0 and d.rows and d.blast_pct is None and d.me_ci is None
    assert all((r.n, r.pct, r.ci_low_pct, r.ci_high_pct) == (0, None, None, None)
               for r in d.rows)
    row = d.rows[0]
    assert value_text(row.pct, 1) == "–" and interval_text(row.ci_low_pct, row.ci_high_pct, 1) == "–"


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
    # 8 blasts in 312: the reported 95% interval (1.1-5.0%) lies below 5%, but the count is
    # looked at after every field, so the stop waits for the 99.9% interval (0.6-7.0%).
    eight = {**clear, "myeloblast": 8}
    assert differential(eight, seed10, on).decisive
    assert adaptive_stop_reason(eight, seed10, on) is None
    assert adaptive_stop_reason(eight, seed10, _params(config, adaptive_stop=True,
                                                       adaptive_min_cells=200,
                                                       adaptive_confidence=0.95))
    strict = interval_text(*(100 * x for x in proportion_ci(2, 312, 0.999)), 1)
    assert f"99.9% interval {strict}%" in reason
    # The shipped taxonomy: the model does not see blasts, so its count decides no threshold
    # however many cells say nothing of them.
    pbc11 = config.classes
    assert all(c.reviewer_only for c in pbc11.classes if c.blast)
    many = {"segmented_neutrophil": 300, "erythroblast": 150, "lymphocyte": 50}
    assert adaptive_stop_reason(many, pbc11, on) is None


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
