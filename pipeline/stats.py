"""Differential statistics: exact 95% intervals, M:E ratio, blast %, threshold flags.

``differential(counts, taxonomy, params)`` turns a slide's counts per class into the numbers
a lab report gives. Intervals are exact Clopper–Pearson intervals from scipy. Percentages are
of all counted (nucleated) cells: non-leukocytes never enter the denominator (WHO counts
blasts among all nucleated marrow cells).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any

from pydantic import Field
from scipy.stats import binomtest

from pipeline.params import Params
from pipeline.taxonomy import Taxonomy


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


@dataclass(frozen=True)
class ClassRow:
    """One class of the differential: ``n`` cells, ``pct`` of counted, exact interval in %."""

    name: str
    label: str
    lineage: str
    blast: bool
    n: int
    pct: float
    ci_low_pct: float
    ci_high_pct: float


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
    exact interval from the binomial split M / (M + E). ``blast_pct`` is None when the
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
    ci = binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="exact")
    return (float(ci.low), float(ci.high))


def differential(counts: dict[str, int], taxonomy: Taxonomy, params: StatsParams) -> Differential:
    """The differential of ``counts`` (class name -> cells) under ``taxonomy``."""
    counted = set(taxonomy.counted)
    total = sum(int(n) for name, n in counts.items() if name in counted)
    not_counted = {name: int(n) for name, n in counts.items() if name not in counted and n}
    conf = params.confidence

    rows = []
    for cls in taxonomy.classes:
        if not cls.counted:
            continue
        n = int(counts.get(cls.name, 0))
        lo, hi = proportion_ci(n, total, conf)
        rows.append(ClassRow(cls.name, cls.label, cls.lineage, cls.blast, n,
                             _pct(n, total), 100 * lo, 100 * hi))

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
    )


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
