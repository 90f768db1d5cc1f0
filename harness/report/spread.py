"""Seed replicates: mean and spread of an entry, and the best/tie rule every report shares.

Records of one entry that differ only in the seed are replicates. Every report (tables, ablation
tables, figures, the HTML site) summarises them the same way:

* **mean** over seeds; re-runs of one seed are averaged first, so they never count as extra seeds;
* **spread** ``s`` = the *sample standard deviation* over seeds (``n - 1`` in the denominator);
  with one seed there is no spread (``None``) and none is shown or drawn;
* **best** per ratio group and column: the best mean as printed (direction from the metric);
* **tie**: an entry whose interval ``mean ± s`` overlaps the best entry's, i.e.
  ``|m - m_best| <= s + s_best`` on the printed (rounded) numbers, with ``s = 0`` for a single
  seed. A reader can check it from the table alone. The best entry is marked too when it has a tie.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

from harness.report.metrics import MetricSpec

__all__ = [
    "SPREAD_NAME",
    "SPREAD_DEFINITION",
    "TIE_MARK",
    "TIE_DEFINITION",
    "SINGLE_SEED_NOTE",
    "Estimate",
    "estimate",
    "displayed",
    "format_estimate",
    "best_and_ties",
    "is_tie",
]

SPREAD_NAME = "sample standard deviation"
SPREAD_DEFINITION = (
    "mean ± s over seeds, s = sample standard deviation (n − 1 in the denominator); n = number of seeds"
)
SINGLE_SEED_NOTE = "n = 1: a single seed, no spread"
TIE_MARK = "‡"
TIE_DEFINITION = (
    f"{TIE_MARK} tie: within the seed spread of the best, i.e. the intervals mean ± s overlap "
    "(|m − m_best| ≤ s + s_best on the printed numbers; s = 0 for a single seed)"
)
_EPS = 1e-9  # printed numbers are decimal; keep 0.1 + 0.2 style float noise from breaking a tie


@dataclass(frozen=True)
class Estimate:
    """An entry's value over its seeds.

    Attributes:
        mean: Mean over seeds (NaN when no seed has a value; ±inf when a seed diverged).
        spread: Sample standard deviation over seeds, or None with fewer than two finite values.
        n: Number of seeds with a value.
    """

    mean: float
    spread: float | None
    n: int

    @property
    def has_value(self) -> bool:
        """Whether there is a finite mean to show."""
        return self.n > 0 and math.isfinite(self.mean)


def estimate(values: Iterable[float | None]) -> Estimate:
    """Mean and sample standard deviation of per-seed values (missing values are left out).

    A non-finite value (a diverged seed) makes the mean non-finite and leaves no spread: a
    spread of numbers that include infinity means nothing.
    """
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    n = len(vals)
    if n == 0:
        return Estimate(math.nan, None, 0)
    if not all(math.isfinite(v) for v in vals):
        return Estimate(math.fsum(vals) / n, None, n)
    mean = math.fsum(vals) / n
    if n < 2:
        return Estimate(mean, None, n)
    var = math.fsum((v - mean) ** 2 for v in vals) / (n - 1)
    return Estimate(mean, math.sqrt(var), n)


def _decimals(spec: MetricSpec) -> int:
    return {"ppl": 2, "acc": 2, "count": 0}.get(spec.kind, 3)


def displayed(spec: MetricSpec, est: Estimate) -> tuple[float, float]:
    """``(mean, s)`` as printed: display units (accuracies in %), rounded; ``s = 0`` without spread."""
    mean = spec.rounded(est.mean)
    spread = 0.0 if est.spread is None else round(abs(spec.display(est.spread)), _decimals(spec))
    return mean, spread


def format_estimate(spec: MetricSpec, est: Estimate, missing: str = "–") -> str:
    """``"13.21 ± 0.14"`` with two or more seeds, the bare value with one, ``missing`` with none."""
    if est.n == 0:
        return missing
    text = spec.format(est.mean)
    if est.spread is None:
        return text
    return f"{text} ± {spec.format(est.spread)}"


def best_and_ties(spec: MetricSpec, estimates: Mapping[Hashable, Estimate]) -> dict[Hashable, str]:
    """Apply the best/tie rule (module docstring) to one ratio group and column.

    Args:
        spec: The column's metric (direction and printed precision).
        estimates: Entry id -> estimate; entries without a finite mean take no part.

    Returns:
        Entry id -> ``"best"`` (the best, nothing within its spread), ``"best tie"`` (a best entry
        that others tie with), ``"tie"`` (within the spread of a best entry) or ``""``, for every id
        in ``estimates``. With fewer than two comparable entries nothing is marked (a lone entry is
        not the best of anything).
    """
    marks: dict[Hashable, str] = dict.fromkeys(estimates, "")
    shown = {k: displayed(spec, e) for k, e in estimates.items() if e.has_value}
    if len(shown) < 2:
        return marks
    pick = max if spec.higher_is_better else min
    best_mean = pick(m for m, _ in shown.values())
    # Equal as printed: all are the best (a reader cannot tell them apart either).
    best = [k for k, (m, _) in shown.items() if abs(m - best_mean) <= _EPS * max(1.0, abs(best_mean))]
    for k in best:
        marks[k] = "best"
    tied = False
    for k, (m, s) in shown.items():
        if k in best:
            continue
        for b in best:
            mb, sb = shown[b]
            if abs(m - mb) <= s + sb + _EPS * max(1.0, abs(mb)):
                marks[k] = "tie"
                tied = True
                break
    if tied:
        for k in best:
            marks[k] = "best tie"  # the seeds do not single out a winner: mark the best as tied too
    return marks


def is_tie(mark: str) -> bool:
    """Whether a mark from :func:`best_and_ties` carries the tie sign."""
    return "tie" in mark.split()
