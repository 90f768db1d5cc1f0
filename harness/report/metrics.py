"""Metric lookup for reports: dotted record keys -> table label, direction and number format.

Every report (leaderboard, plots, compare, scenarios) asks this module what a metric is called and
which direction is better. The answer comes from the evaluation that owns the metric (its
:class:`harness.evaluations.MetricSpec`, registered once with the evaluation), so a metric's
direction is defined in one place. Keys are the dotted paths of the flattened store frame
(``wikitext2.ppl``, ``zeroshot.tasks.piqa.value``, ...); short aliases (``wikitext2``, ``piqa``,
``average``) resolve to the same spec.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable

from harness.evaluations import EVALUATIONS, MetricSpec, evaluation_of_key
from harness.evaluations.zeroshot import TASK_KEY

__all__ = [
    "MetricSpec",
    "UnknownMetricError",
    "registered_metrics",
    "metric_aliases",
    "resolve_metric",
    "metric_columns",
    "is_metric_column",
    "relative_change",
    "verdict",
]


class UnknownMetricError(KeyError):
    """Raised for a metric name that is neither registered nor present in the store."""

    def __str__(self) -> str:  # KeyError would repr() the message and add quotes
        return str(self.args[0]) if self.args else ""


def registered_metrics() -> dict[str, MetricSpec]:
    """Every metric the registered evaluations list, in registration (paper column) order."""
    return {spec.key: spec for _, ev in EVALUATIONS.items() for spec in ev.metrics}


def metric_aliases() -> dict[str, str]:
    """Short names -> metric keys, from every registered evaluation."""
    return {alias: key for _, ev in EVALUATIONS.items() for alias, key in ev.aliases.items()}


_PPL_RE = re.compile(r"^([^.]+)\.ppl$")


def _spec_of(key: str) -> MetricSpec | None:
    """The owning evaluation's spec of ``key``; perplexity keys of unregistered datasets (records
    written by other versions) still read as perplexities."""
    evaluation = evaluation_of_key(key)
    if evaluation is not None and (spec := evaluation.metric(key)) is not None:
        return spec
    if m := _PPL_RE.match(key):
        return MetricSpec(key, m.group(1), False, "ppl")
    return None


def resolve_metric(name: str, available: Iterable[str] = ()) -> MetricSpec:
    """Resolve a metric name, alias or dotted key to its spec.

    Args:
        name: A registered key (``"wikitext2.ppl"``), an alias (``"wikitext2"``, ``"piqa"``,
            ``"average"``) or any dotted key of a known shape (``"zeroshot.tasks.foo.value"``).
        available: Extra dotted keys present in a store (their task names become valid aliases).

    Returns:
        The metric spec.

    Raises:
        UnknownMetricError: If the name is unknown; the message lists close matches.
    """
    available = list(available)
    registered = registered_metrics()
    aliases = metric_aliases()
    key = aliases.get(name, name)
    if key in registered:
        return registered[key]
    # Task names that only appear in the store ("zeroshot.tasks.copa.value" -> "copa").
    for col in available:
        m = TASK_KEY.match(col)
        if m and m.group(2) == "value" and name in (m.group(1), f"zeroshot.{m.group(1)}"):
            key = col
            break
    spec = _spec_of(key)
    if spec is not None:
        return spec
    candidates = sorted(set(registered) | set(aliases) | {c for c in available if is_metric_column(c)})
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownMetricError(
        f"unknown metric {name!r}.{hint} Known metrics: {', '.join(sorted(aliases))} "
        "(or any dotted key such as 'zeroshot.tasks.<task>.value')."
    )


def is_metric_column(column: str) -> bool:
    """Whether a flattened frame column is a metric shown by default (not a protocol id, a count of
    non-finite windows, an acc/acc_norm variant or a stderr)."""
    if column.endswith("_stderr"):
        return False
    spec = _spec_of(column)
    return spec is not None and spec.in_tables


def metric_columns(columns: Iterable[str], include_task_variants: bool = False) -> list[str]:
    """The metric columns among ``columns``, in paper order: evaluations in registration order
    (perplexities, zero-shot tasks then their average, embedding fidelity, efficiency, then
    evaluations registered later), each evaluation's metrics in its own order.

    Args:
        columns: Frame columns.
        include_task_variants: Also return ``zeroshot.tasks.<t>.acc``/``acc_norm`` columns; by
            default only the reported ``value`` of each task is a metric column.

    Returns:
        Ordered list of metric keys.
    """
    names = EVALUATIONS.names()
    index = {name: float(i) for i, name in enumerate(names)}
    # Perplexities of datasets no registered evaluation owns sort right after the registered ones.
    ppl_end = max((index[n] for n, ev in EVALUATIONS.items() if any(m.kind == "ppl" for m in ev.metrics)), default=-1.0) + 0.5

    def wanted(col: str) -> bool:
        if is_metric_column(col):
            return True
        return include_task_variants and bool(TASK_KEY.match(col))

    def sort_key(col: str) -> tuple[float, float, str]:
        evaluation = evaluation_of_key(col)
        if evaluation is None:
            return (ppl_end if _PPL_RE.match(col) else math.inf, 0.0, col)
        return (index[evaluation.name], evaluation.position(col), col)

    return sorted((c for c in columns if wanted(c)), key=sort_key)


def relative_change(baseline: float, current: float) -> float:
    """``(current - baseline) / |baseline|``; ±inf when a zero baseline moved, 0 when both are equal."""
    if current == baseline:
        return 0.0
    if baseline == 0 or math.isinf(current):
        return math.copysign(math.inf, current - baseline)
    return (current - baseline) / abs(baseline)


def verdict(spec: MetricSpec, baseline: float, current: float, rtol: float) -> str:
    """``"worse"``, ``"better"`` or ``"ok"`` for one metric, direction from ``spec``."""
    if math.isnan(current):
        return "missing"
    rel = relative_change(baseline, current)
    signed = rel if spec.higher_is_better else -rel  # > 0 means improvement
    if signed < -rtol:
        return "worse"
    return "better" if signed > rtol else "ok"
