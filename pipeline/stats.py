"""Differential statistics: exact 95% intervals, M:E ratio, blast %, threshold flags, and
each value against the laboratory's reference interval.

``differential(counts, taxonomy, params)`` turns a slide's counts per class into the numbers
a lab report gives. Intervals are exact Clopper–Pearson intervals from scipy. Percentages are
of all counted (nucleated) cells: non-leukocytes never enter the denominator (WHO counts
blasts among all nucleated marrow cells).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from pydantic import Field, model_validator

from pipeline.params import Params
from pipeline.taxonomy import Taxonomy

#: The key of ``reference_intervals`` that holds the M:E ratio's interval (a ratio, not a %).
ME_RATIO = "me_ratio"


class StatsParams(Params):
    """The ``stats:`` config section (defaults in config/default.yaml)."""

    confidence: float = Field(gt=0.5, lt=1, description="interval coverage, e.g. 0.95")
    blast_thresholds_pct: tuple[float, ...] = Field(
        min_length=0, description="clinical blast % cut-offs an interval is checked against"
    )
    adaptive_stop: bool = Field(
        description="stop a slide before its target once every flagged interval is decisive"
    )
    adaptive_min_cells: int = Field(gt=0, description="never stop adaptively below this count")
    reference_intervals: dict[str, tuple[float, float]] = Field(
        description="the laboratory's reference interval per class name (% of counted cells) "
        "and for 'me_ratio'; a value outside is marked L or H"
    )

    @model_validator(mode="after")
    def _ordered_intervals(self) -> "StatsParams":
        for name, (lo, hi) in self.reference_intervals.items():
            top = None if name == ME_RATIO else 100.0
            if not (0 <= lo <= hi) or (top is not None and hi > top):
                raise ValueError(
                    f"reference_intervals.{name}: [{lo:g}, {hi:g}] must satisfy 0 <= low <= high"
                    + (" <= 100 (percent of counted cells)" if top is not None else ""))
        return self


@dataclass(frozen=True)
class ClassRow:
    """One class of the differential: ``n`` cells, ``pct`` of counted, exact interval in %.

    ``reference`` is the laboratory's reference interval in % (None when none is set);
    ``outside`` is "L" or "H" when ``pct`` lies below or above it, else None.
    """

    name: str
    label: str
    lineage: str
    blast: bool
    n: int
    pct: float
    ci_low_pct: float
    ci_high_pct: float
    reference: tuple[float, float] | None = None
    outside: str | None = None


@dataclass(frozen=True)
class ThresholdFlag:
    """An interval that straddles a clinical threshold: the count cannot decide that side."""

    quantity: str
    threshold_pct: float
    ci_low_pct: float
    ci_high_pct: float
    message: str


@dataclass(frozen=True)
class Differential:
    """A slide's differential. ``total`` counted cells; percentages are of ``total``.

    ``me_ratio`` is myeloid / erythroid (None when no erythroid cell was counted) with an
    exact interval from the binomial split M / (M + E), and ``me_reference`` / ``me_outside``
    as for a class row. ``blast_pct`` is None when the
    taxonomy has no blast class. ``not_counted`` holds classes left out of the differential
    (non-leukocytes, labels outside the taxonomy).
    """

    total: int
    confidence: float
    rows: tuple[ClassRow, ...]
    myeloid: int
    erythroid: int
    me_ratio: float | None
    me_ci: tuple[float, float] | None
    blast_n: int | None
    blast_pct: float | None
    blast_ci_pct: tuple[float, float] | None
    flags: tuple[ThresholdFlag, ...]
    not_counted: dict[str, int] = field(default_factory=dict)
    me_reference: tuple[float, float] | None = None
    me_outside: str | None = None

    @property
    def decisive(self) -> bool:
        """True when no interval straddles a threshold."""
        return not self.flags

    def row(self, name: str) -> ClassRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@lru_cache(maxsize=65536)
def proportion_ci(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact Clopper–Pearson interval for ``k`` successes of ``n`` (fractions in [0, 1]).

    Cached: a pure function of its integers, and scipy's root search costs ~2 ms a call.
    """
    if n <= 0:
        return (0.0, 1.0)
    # Imported here: scipy.stats costs ~0.5 s, and every CLI command imports this module
    # through the config (StatsParams) whether or not it computes an interval.
    from scipy.stats import binomtest

    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return (float(ci.low), float(ci.high))


def differential(counts: dict[str, int], taxonomy: Taxonomy, params: StatsParams) -> Differential:
    """The differential of ``counts`` (class name -> cells) under ``taxonomy``."""
    counted = set(taxonomy.counted)
    total = sum(int(n) for name, n in counts.items() if name in counted)
    not_counted = {name: int(n) for name, n in counts.items() if name not in counted and n}
    conf = params.confidence

    refs = params.reference_intervals
    rows = []
    for cls in taxonomy.classes:
        if not cls.counted:
            continue
        n = int(counts.get(cls.name, 0))
        lo, hi = proportion_ci(n, total, conf)
        ref = refs.get(cls.name)
        rows.append(ClassRow(cls.name, cls.label, cls.lineage, cls.blast, n,
                             _pct(n, total), 100 * lo, 100 * hi, ref,
                             outside_reference(_pct(n, total) if total else None, ref, 2)))

    myeloid = sum(r.n for r in rows if r.lineage == "myeloid")
    erythroid = sum(r.n for r in rows if r.lineage == "erythroid")
    me_ratio = me_ci = None
    if erythroid:
        me_ratio = myeloid / erythroid
        lo, hi = proportion_ci(myeloid, myeloid + erythroid, conf)
        # p = M / (M + E) maps monotonically onto M:E = p / (1 - p).
        me_ci = (lo / (1 - lo), float("inf") if hi >= 1 else hi / (1 - hi))

    blast_n = blast_pct = blast_ci = None
    flags: list[ThresholdFlag] = []
    if any(r.blast for r in rows):
        blast_n = sum(r.n for r in rows if r.blast)
        blast_pct = _pct(blast_n, total)
        lo, hi = proportion_ci(blast_n, total, conf)
        blast_ci = (100 * lo, 100 * hi)
        for t in params.blast_thresholds_pct:
            if blast_ci[0] < t < blast_ci[1]:
                flags.append(ThresholdFlag(
                    "blast %", t, blast_ci[0], blast_ci[1],
                    f"blast % {conf:.0%} interval {blast_ci[0]:.1f}–{blast_ci[1]:.1f}% "
                    f"straddles {t:g}%: the count cannot tell which side",
                ))
    return Differential(
        total=total, confidence=conf, rows=tuple(rows), myeloid=myeloid, erythroid=erythroid,
        me_ratio=me_ratio, me_ci=me_ci, blast_n=blast_n, blast_pct=blast_pct,
        blast_ci_pct=blast_ci, flags=tuple(flags), not_counted=not_counted,
        me_reference=refs.get(ME_RATIO), me_outside=outside_reference(me_ratio, refs.get(ME_RATIO), 3),
    )


def outside_reference(value: float | None, reference: tuple[float, float] | None,
                      decimals: int) -> str | None:
    """"L" below the reference interval, "H" above it, None inside it or when either is
    missing (no cells counted, no interval set). The value is judged as the report's JSON and
    CSV record it (rounded to ``decimals``: 2 for %, 3 for M:E), so a recorded 3.00 is never
    marked H against an interval 0-3; the bounds belong to the interval."""
    if value is None or reference is None:
        return None
    lo, hi = reference
    value = round(value, decimals)
    return "L" if value < lo else "H" if value > hi else None


def adaptive_stop_reason(
    counts: dict[str, int], taxonomy: Taxonomy, params: StatsParams
) -> str | None:
    """Why a slide may stop before its target, or None to keep counting.

    Only with ``adaptive_stop`` on, at least ``adaptive_min_cells`` counted, a taxonomy that
    has a blast class, and every blast threshold decided by the interval.
    """
    if not params.adaptive_stop or not params.blast_thresholds_pct:
        return None
    d = differential(counts, taxonomy, params)
    if d.total < params.adaptive_min_cells or d.blast_ci_pct is None or d.flags:
        return None
    lo, hi = d.blast_ci_pct
    return (f"adaptive stop at {d.total} cells: blast % interval {lo:.1f}–{hi:.1f}% "
            f"decides every threshold ({', '.join(f'{t:g}%' for t in params.blast_thresholds_pct)})")


def _pct(n: int, total: int) -> float:
    return 100.0 * n / total if total else 0.0
