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
  One exception: a perplexity interval ``mean ± s`` that reaches below 1, the least perplexity
  there is, says the seeds are too skewed for ``mean ± s`` (a collapsed method's seeds can differ
  fiftyfold, and such an interval "overlaps" every other entry). When either interval does, the
  same overlap test runs on the log scale that perplexity exponentiates (the per-token NLL):
  ``|mean ln m − mean ln m_best| <= s_ln + s_ln_best`` over the per-seed values.
* **paired** (zero-shot columns, :mod:`harness.report.paired`): the caller may pass a paired test
  over documents; an entry the seed rule separates from the best still ties unless the paired
  test separates it too. Without per-document data the seed rule alone decides.

Collapsed perplexities (mean ≥ 10^5) print in compact notation, two significant digits, the spread
in the same notation (``6.8e7 ± 3.8e2``): their decimals carry no information and would make the
column unreadable. "Printed numbers" in the tie rule are then the compact ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass

from harness.report.metrics import MetricSpec

__all__ = [
    "SPREAD_NAME",
    "SPREAD_DEFINITION",
    "TIE_MARK",
    "TIE_DEFINITION",
    "SEED_TIE_RULE",
    "SINGLE_SEED_NOTE",
    "COMPACT_FROM",
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
SEED_TIE_RULE = (
    "within the seed spread of the best, i.e. the intervals mean ± s overlap "
    "(|m − m_best| ≤ s + s_best on the printed numbers; s = 0 for a single seed; a perplexity interval "
    "reaching below 1 is too skewed for mean ± s: that test then runs on the per-seed ln ppl)"
)
TIE_DEFINITION = f"{TIE_MARK} tie: {SEED_TIE_RULE}"
COMPACT_FROM = 1e5  # perplexities from here on print as 6.8e7: a collapsed model, not a number to read to 0.01
_EPS = 1e-9  # printed numbers are decimal; keep 0.1 + 0.2 style float noise from breaking a tie


@dataclass(frozen=True)
class Estimate:
    """An entry's value over its seeds.

    Attributes:
        mean: Mean over seeds (NaN when no seed has a value; ±inf when a seed diverged).
        spread: Sample standard deviation over seeds, or None with fewer than two finite values.
        n: Number of seeds with a value.
        log_mean: Mean over seeds of ``ln value`` when every value is finite and positive, else None.
        log_spread: Sample standard deviation of ``ln value`` (None with fewer than two seeds).
    """

    mean: float
    spread: float | None
    n: int
    log_mean: float | None = None
    log_spread: float | None = None

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
    mean, sd = _mean_sd(vals)
    logs = _mean_sd([math.log(v) for v in vals]) if all(v > 0 for v in vals) else (None, None)
    return Estimate(mean, sd, n, *logs)


def _mean_sd(vals: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value) of a non-empty list."""
    mean = math.fsum(vals) / len(vals)
    if len(vals) < 2:
        return mean, None
    return mean, math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def _decimals(spec: MetricSpec) -> int:
    return {"ppl": 2, "acc": 2, "count": 0}.get(spec.kind, 3)


def _compact(spec: MetricSpec, mean: float) -> bool:
    """Whether an estimate with this mean prints in compact notation (module docstring)."""
    return spec.kind == "ppl" and math.isfinite(mean) and abs(mean) >= COMPACT_FROM


def _sci(value: float) -> str:
    """Two significant digits, exponent without ``+`` or leading zeros: ``6.8e7``, ``3.8e-1``."""
    mantissa, _, exponent = f"{value:.1e}".partition("e")
    return f"{mantissa}e{int(exponent)}"


def displayed(spec: MetricSpec, est: Estimate) -> tuple[float, float]:
    """``(mean, s)`` as printed: display units (accuracies in %), rounded; ``s = 0`` without spread."""
    if _compact(spec, est.mean):
        return float(_sci(est.mean)), 0.0 if est.spread is None else float(_sci(abs(est.spread)))
    mean = spec.rounded(est.mean)
    spread = 0.0 if est.spread is None else round(abs(spec.display(est.spread)), _decimals(spec))
    return mean, spread


def format_estimate(spec: MetricSpec, est: Estimate, missing: str = "–") -> str:
    """``"13.21 ± 0.14"`` with two or more seeds, the bare value with one, ``missing`` with none;
    ``"6.8e7 ± 3.8e2"`` for collapsed perplexities."""
    if est.n == 0:
        return missing
    fmt = _sci if _compact(spec, est.mean) else spec.format
    text = fmt(est.mean)
    if est.spread is None:
        return text
    return f"{text} ± {fmt(est.spread)}"


def best_and_ties(
    spec: MetricSpec,
    estimates: Mapping[Hashable, Estimate],
    paired: Callable[[Hashable, Hashable], bool | None] | None = None,
) -> dict[Hashable, str]:
    """Apply the best/tie rule (module docstring) to one ratio group and column.

    Args:
        spec: The column's metric (direction and printed precision).
        estimates: Entry id -> estimate; entries without a finite mean take no part.
        paired: For zero-shot columns, ``paired(entry, best)`` from
            :func:`harness.report.paired.paired_test`: False ties two entries the seed rule
            separates; True or None (no per-document data) leaves the seed rule's verdict.

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
    for k in shown:
        if k in best:
            continue
        for b in best:
            # Separated only when both rules separate: the seed spread and, where given, the documents.
            if _within_spread(spec, estimates[k], estimates[b]) or (paired is not None and paired(k, b) is False):
                marks[k] = "tie"
                tied = True
                break
    if tied:
        for k in best:
            marks[k] = "best tie"  # the seeds do not single out a winner: mark the best as tied too
    return marks


def _within_spread(spec: MetricSpec, entry: Estimate, best: Estimate) -> bool:
    """The tie test of one entry against one best entry (module docstring)."""
    (m, s), (mb, sb) = displayed(spec, entry), displayed(spec, best)
    skewed = spec.kind == "ppl" and min(m - s, mb - sb) < 1.0
    if skewed and entry.log_mean is not None and best.log_mean is not None:
        return abs(entry.log_mean - best.log_mean) <= (entry.log_spread or 0.0) + (best.log_spread or 0.0) + _EPS
    return abs(m - mb) <= s + sb + _EPS * max(1.0, abs(mb))


def is_tie(mark: str) -> bool:
    """Whether a mark from :func:`best_and_ties` carries the tie sign."""
    return "tie" in mark.split()
