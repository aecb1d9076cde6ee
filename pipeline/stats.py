"""Differential statistics: exact 95% intervals, M:E ratio, blast %, threshold flags, and
each value against the laboratory's reference interval.

``differential(counts, taxonomy, params)`` turns a slide's counts per class into the numbers
a lab report gives. Intervals are exact Clopper–Pearson intervals from scipy. Percentages are
of all counted (nucleated) cells: non-leukocytes never enter the denominator (WHO counts
blasts among all nucleated marrow cells). ``value_text`` and ``interval_text`` write them
for people: a value as precise as its L / H mark needs, an interval rounded outward.
"""

from __future__ import annotations

import math
from decimal import ROUND_HALF_UP, Decimal
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Sequence

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
    min_reportable_cells: int = Field(
        ge=0, description="a count below this is flagged as too small for a differential "
                          "(the laboratory's minimum; ICSH asks for 500 in marrow), whatever "
                          "the slide's target was")
    adaptive_confidence: float = Field(
        gt=0.5, lt=1, description="coverage of the interval that decides an adaptive stop "
        "(stricter than `confidence`: the count is looked at after every field)")
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
        if self.adaptive_stop and self.adaptive_min_cells < self.min_reportable_cells:
            raise ValueError(f"adaptive_min_cells {self.adaptive_min_cells} must be at least "
                             f"min_reportable_cells {self.min_reportable_cells}: a slide "
                             "stopped early would be too small to report")
        if self.adaptive_confidence < self.confidence:
            # A stop decided at a looser interval than the report's would then be reported
            # as straddling the threshold it was stopped for.
            raise ValueError(f"adaptive_confidence {self.adaptive_confidence:g} must be at "
                             f"least confidence {self.confidence:g}")
        return self


@dataclass(frozen=True)
class ClassRow:
    """One class of the differential: ``n`` cells, ``pct`` of counted, exact interval in %
    (all three None when no cell was counted: 0 of 0 is no observation, not 0%).

    ``reference`` is the laboratory's reference interval in % (None when none is set);
    ``outside`` is "L" or "H" when ``pct`` lies below or above it, else None.
    ``reviewer_only``: the model never outputs this class, only a reviewer names it.
    """

    name: str
    label: str
    lineage: str
    blast: bool
    n: int
    pct: float | None
    ci_low_pct: float | None
    ci_high_pct: float | None
    reference: tuple[float, float] | None = None
    outside: str | None = None
    reviewer_only: bool = False


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

    ``me_ratio`` is myeloid / erythroid (None when no erythroid cell was counted: with
    myeloid cells it is infinite, its interval ``(low, inf)`` and above any reference) with an
    exact interval from the binomial split M / (M + E), and ``me_reference`` / ``me_outside``
    as for a class row; ``myeloid_classes`` / ``erythroid_classes`` name what each side counts.
    ``blast_pct`` is None when the taxonomy has no blast class, or when only a reviewer
    names blasts (``blast_reviewer_only``) and these are the machine's counts; the machine's
    counts have no row for a reviewer-only class either (``not_reported`` names them: a 0%
    there is not an observation).
    ``not_counted`` holds classes left out of the differential (non-leukocytes, labels
    outside the taxonomy).
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
    myeloid_classes: tuple[str, ...] = ()
    erythroid_classes: tuple[str, ...] = ()
    blast_reviewer_only: bool = False
    not_reported: tuple[str, ...] = ()

    @property
    def me_infinite(self) -> bool:
        """Myeloid cells and no erythroid one (``me_ratio`` None means this or "not defined")."""
        return bool(self.myeloid and not self.erythroid)

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
        """Plain, JSON-ready data: an infinite M:E bound (no erythroid cell) is None, and
        ``me_infinite`` tells an infinite ratio from an undefined one."""
        out = asdict(self)
        out["me_infinite"] = self.me_infinite
        if self.me_ci is not None:
            out["me_ci"] = [None if math.isinf(x) else x for x in self.me_ci]
        return out


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


def differential(counts: dict[str, int], taxonomy: Taxonomy, params: StatsParams, *,
                 machine: bool = False) -> Differential:
    """The differential of ``counts`` (class name -> cells) under ``taxonomy``.

    ``machine``: the counts are the model's alone, so a reviewer-only class is empty by
    construction, not by observation: it gets no row (``not_reported``), and the blast % is
    not given when every blast class is reviewer-only (a count the model made cannot say
    there are no blasts)."""
    counted = set(taxonomy.counted)
    total = sum(int(n) for name, n in counts.items() if name in counted)
    not_counted = {name: int(n) for name, n in counts.items() if name not in counted and n}
    conf = params.confidence

    refs = params.reference_intervals
    rows = []
    not_reported = []
    for cls in taxonomy.classes:
        if not cls.counted:
            continue
        if machine and cls.reviewer_only:
            not_reported.append(cls.name)
            continue
        n = int(counts.get(cls.name, 0))
        ref = refs.get(cls.name)
        pct = lo = hi = None
        if total:
            pct = 100.0 * n / total
            lo, hi = (100 * x for x in proportion_ci(n, total, conf))
        rows.append(ClassRow(cls.name, cls.label, cls.lineage, cls.blast, n, pct, lo, hi, ref,
                             outside_reference(pct, ref, 2), cls.reviewer_only))

    myeloid = sum(r.n for r in rows if r.lineage == "myeloid")
    erythroid = sum(r.n for r in rows if r.lineage == "erythroid")
    me_ratio = me_ci = None
    if myeloid + erythroid:
        lo, hi = proportion_ci(myeloid, myeloid + erythroid, conf)
        # p = M / (M + E) maps monotonically onto M:E = p / (1 - p).
        me_ci = (lo / (1 - lo) if lo < 1 else math.inf, math.inf if hi >= 1 else hi / (1 - hi))
        if erythroid:
            me_ratio = myeloid / erythroid
    me_ref = refs.get(ME_RATIO)
    # Myeloid cells and no erythroid one: the ratio is infinite, above any interval.
    me_outside = ("H" if me_ref is not None and myeloid and not erythroid
                  else outside_reference(me_ratio, me_ref, 3))

    blasts = [c for c in taxonomy.classes if c.blast and c.counted]
    reviewer_only = bool(blasts) and all(c.reviewer_only for c in blasts)
    blast_n = blast_pct = blast_ci = None
    flags: list[ThresholdFlag] = []
    # No cell counted: no blast %, and no interval of 0-100% across every threshold.
    if blasts and total and not (machine and reviewer_only):
        blast_n = sum(r.n for r in rows if r.blast)
        blast_pct = 100.0 * blast_n / total
        lo, hi = proportion_ci(blast_n, total, conf)
        blast_ci = (100 * lo, 100 * hi)
        for t in params.blast_thresholds_pct:
            if blast_ci[0] < t < blast_ci[1]:
                flags.append(ThresholdFlag(
                    "blast %", t, blast_ci[0], blast_ci[1],
                    f"blast % {confidence_text(conf)} interval {interval_text(*blast_ci, 1)}% "
                    f"straddles {t:g}%: the count cannot tell which side",
                ))
    return Differential(
        total=total, confidence=conf, rows=tuple(rows), myeloid=myeloid, erythroid=erythroid,
        me_ratio=me_ratio, me_ci=me_ci, blast_n=blast_n, blast_pct=blast_pct,
        blast_ci_pct=blast_ci, flags=tuple(flags), not_counted=not_counted,
        me_reference=me_ref, me_outside=me_outside,
        myeloid_classes=tuple(c.name for c in taxonomy.classes
                              if c.counted and c.lineage == "myeloid"),
        erythroid_classes=tuple(c.name for c in taxonomy.classes
                                if c.counted and c.lineage == "erythroid"),
        blast_reviewer_only=reviewer_only, not_reported=tuple(not_reported),
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


def confidence_text(confidence: float) -> str:
    """An interval's coverage as a report heads it: "95%", "97.5%" (never rounded to "98%")."""
    return f"{100 * confidence:.10g}%"


def value_text(value: float | None, decimals: int, outside: str | None = None,
               reference: Sequence[float] | None = None, judged_at: int | None = None,
               *, missing: str = "–") -> str:
    """``value`` for a person, to ``decimals`` places; one that ``outside_reference`` marked L
    or H gets the places it was judged at (``judged_at``) when the shorter text would sit on
    the interval's bound ("5.0 H" against 0–5 reads as a contradiction: it is 5.03).
    None reads ``missing``: "–" (no cell counted), or "∞" for an M:E ratio with no
    erythroid cell."""
    if value is None:
        return missing
    text = _half_up(value, decimals)
    if outside and reference is not None and judged_at is not None:
        shown = float(text)
        if reference[0] <= shown <= reference[1]:
            text = _half_up(value, judged_at)
    return text


def _half_up(value: float, decimals: int) -> str:
    """``value`` to ``decimals`` places, a half rounded up as people do on paper (1 of 400 is
    0.25% → "0.3", M:E 9:8 = 1.125 → "1.13"; Python's format gave "0.2" and "1.12")."""
    value = float(value) + 0.0  # a numpy scalar's repr is not a number; -0.0 reads 0.0
    if not math.isfinite(value):
        return "∞" if value > 0 else str(value)
    return str(Decimal(repr(value)).quantize(Decimal(1).scaleb(-decimals), ROUND_HALF_UP))


def interval_text(low: float | None, high: float | None, decimals: int, sep: str = "–") -> str:
    """An interval rounded outward to ``decimals`` places (so it never looks narrower than it
    is: 0.5–5.04% must not read 0.5–5.0% beside a flag saying it straddles 5%); an infinite
    upper bound reads "∞", no interval at all (no cell counted) "–"."""
    if low is None or high is None:
        return "–"
    return f"{round_out(low, decimals, False):.{decimals}f}{sep}" + (
        "∞" if math.isinf(high) else f"{round_out(high, decimals, True):.{decimals}f}")


def round_out(x: float, decimals: int, up: bool) -> float:
    """``x`` rounded to ``decimals`` places away from the inside of an interval (down for a
    lower bound, up for an upper one); the 1e-9 keeps an exact 20.0 from becoming 20.1."""
    scale = 10 ** decimals
    v = x * scale
    return (math.ceil(v - 1e-9) if up else math.floor(v + 1e-9)) / scale


def adaptive_stop_reason(
    counts: dict[str, int], taxonomy: Taxonomy, params: StatsParams
) -> str | None:
    """Why a slide may stop before its target, or None to keep counting.

    Only with ``adaptive_stop`` on, at least ``adaptive_min_cells`` counted, a taxonomy that
    has a blast class, and every blast threshold decided by the blast interval at
    ``adaptive_confidence``. The count is looked at after every field, and each look is one
    more chance to stop on a chance excursion: deciding at the reported 95% after each field
    put 2% of slides at 5.5% or 21% blasts on the wrong side of 5% or 20% (0.8% for a fixed
    500-cell count), so each look uses a stricter interval (99.9%: the Haybittle–Peto rule
    for interim looks), and the reported interval keeps its stated coverage.
    """
    if not params.adaptive_stop:
        return None
    return blast_thresholds_decided(differential(counts, taxonomy, params, machine=True),
                                    params)


def blast_thresholds_decided(d: Differential, params: StatsParams) -> str | None:
    """Why a count ``d`` bears out an adaptive stop, or None: at least
    ``adaptive_min_cells`` counted, a blast class, and every blast threshold outside the
    blast interval at ``adaptive_confidence``. The daemon stops on the machine's count; a
    report asks it again of the reviewed count (excluded cells can undecide a threshold)."""
    if not params.blast_thresholds_pct:
        return None
    if d.total < params.adaptive_min_cells or d.blast_n is None:
        return None
    lo, hi = (100 * x for x in proportion_ci(d.blast_n, d.total, params.adaptive_confidence))
    if any(lo < t < hi for t in params.blast_thresholds_pct):
        return None
    return (f"adaptive stop at {d.total} cells: blast % "
            f"{confidence_text(params.adaptive_confidence)} interval "
            f"{interval_text(lo, hi, 1)}% decides every threshold "
            f"({', '.join(f'{t:g}%' for t in params.blast_thresholds_pct)})")
