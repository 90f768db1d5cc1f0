"""Metric registry: dotted record keys -> table label, direction and number format.

Every report (leaderboard, plots, compare, scenarios) asks this module what a metric is called
and which direction is better, so the direction is defined once. Keys are the dotted paths of
the flattened store frame (``wikitext2.ppl``, ``zeroshot.tasks.piqa.value``, ...); short
aliases (``wikitext2``, ``piqa``, ``average``) resolve to the same spec.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = [
    "MetricSpec",
    "UnknownMetricError",
    "METRICS",
    "DEFAULT_METRIC_ORDER",
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


@dataclass(frozen=True)
class MetricSpec:
    """How one metric is labelled, compared and formatted.

    Attributes:
        key: Dotted column key in the store frame, e.g. ``"wikitext2.ppl"``.
        label: Short column header without the direction arrow, e.g. ``"WikiText-2"``.
        higher_is_better: Direction used for bolding and regression verdicts.
        kind: ``"ppl"`` (2 decimals, thousands separators), ``"acc"`` (fraction shown as a
            percentage), ``"score"`` (3 decimals) or ``"count"`` (integer).
    """

    key: str
    label: str
    higher_is_better: bool
    kind: str

    @property
    def arrow(self) -> str:
        """The direction arrow used in table headers (↑ or ↓)."""
        return "↑" if self.higher_is_better else "↓"

    def display(self, value: float) -> float:
        """Value as shown in tables (accuracies become percentages)."""
        return value * 100.0 if self.kind == "acc" else value

    def format(self, value: float | None) -> str:
        """Format a raw value for a human table; NaN/None become an en dash.

        Args:
            value: The raw metric value from the record (accuracies as fractions).

        Returns:
            The formatted string, e.g. ``"39,661.03"`` or ``"61.00"``.
        """
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        if isinstance(value, float) and math.isinf(value):
            return "∞" if value > 0 else "-∞"
        if self.kind == "ppl":
            return f"{value:,.2f}"
        if self.kind == "acc":
            return f"{value * 100.0:.2f}"
        if self.kind == "count":
            return f"{int(round(value)):,d}"
        return f"{value:.3f}"

    def rounded(self, value: float) -> float:
        """The value rounded to its displayed precision (ties are judged on what readers see)."""
        decimals = {"ppl": 2, "acc": 2, "count": 0}.get(self.kind, 3)
        return round(self.display(value), decimals)


# Zero-shot tasks in the column order SVD papers use (C1 of the style notes), with their short labels.
_ZEROSHOT_TASKS: dict[str, str] = {
    "openbookqa": "Openb.",
    "arc_easy": "ARC_e",
    "arc_challenge": "ARC_c",
    "winogrande": "WinoG.",
    "hellaswag": "HellaS.",
    "piqa": "PIQA",
    "mathqa": "MathQA",
    "boolq": "BoolQ",
    "mmlu": "MMLU",
    "lambada_openai": "LAMBADA",
}

_PPL_DATASETS: dict[str, str] = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}


def _build_registry() -> tuple[dict[str, MetricSpec], dict[str, str]]:
    specs: dict[str, MetricSpec] = {}
    aliases: dict[str, str] = {}
    for ds, label in _PPL_DATASETS.items():
        key = f"{ds}.ppl"
        specs[key] = MetricSpec(key, label, higher_is_better=False, kind="ppl")
        aliases[ds] = key
    aliases["wikitext"] = aliases["wt2"] = "wikitext2.ppl"
    for task, label in _ZEROSHOT_TASKS.items():
        key = f"zeroshot.tasks.{task}.value"
        specs[key] = MetricSpec(key, label, higher_is_better=True, kind="acc")
        aliases[task] = aliases[f"zeroshot.{task}"] = aliases[f"zeroshot.tasks.{task}"] = key
    specs["zeroshot.average"] = MetricSpec("zeroshot.average", "Average", True, "acc")
    aliases["average"] = aliases["avg"] = aliases["zeroshot"] = "zeroshot.average"
    for field, label, hib in (
        ("mean_cos", "Emb. cos", True),
        ("p05_cos", "Emb. cos p5", True),
        ("mean_err_norm", "Emb. err", False),
    ):
        key = f"embed-fidelity.{field}"
        specs[key] = MetricSpec(key, label, hib, "score")
        aliases[field] = key
    aliases["embed-fidelity"] = aliases["embed"] = "embed-fidelity.mean_cos"
    # Efficiency (harness/efficiency.py): speed-ups over the dense model of the same run, stored
    # bytes and prefill peak memory; absolute tokens/s are recorded on GPUs only.
    for field, label, hib, kind in (
        ("prefill.speedup", "Prefill ×", True, "score"),
        ("decode.speedup", "Decode ×", True, "score"),
        ("weight_bytes.model", "Weight bytes", False, "count"),
        ("weight_bytes.targets", "Target bytes", False, "count"),
        ("weight_bytes.model_ratio", "Bytes / dense", False, "score"),
        ("peak_prefill_bytes.total", "Prefill peak bytes", False, "count"),
        ("prefill.tokens_per_s", "Prefill tok/s", True, "score"),
        ("decode.tokens_per_s", "Decode tok/s", True, "score"),
    ):
        key = f"efficiency.{field}"
        specs[key] = MetricSpec(key, label, hib, kind)
    aliases["efficiency"] = aliases["decode_speedup"] = "efficiency.decode.speedup"
    aliases["prefill_speedup"] = "efficiency.prefill.speedup"
    aliases["weight_bytes"] = "efficiency.weight_bytes.model"
    return specs, aliases


METRICS, _ALIASES = _build_registry()

#: Registered metrics in paper column order: perplexities, zero-shot tasks, average, embeddings.
DEFAULT_METRIC_ORDER: tuple[str, ...] = tuple(METRICS)

_TASK_RE = re.compile(r"^zeroshot\.tasks\.([^.]+)\.(value|acc|acc_norm)$")
_PPL_RE = re.compile(r"^([^.]+)\.ppl$")
_NONFINITE_RE = re.compile(r"^([^.]+)\.nonfinite_windows$")


def _pattern_spec(key: str) -> MetricSpec | None:
    """Spec for keys that follow a known shape but are not registered (new tasks/datasets)."""
    if m := _TASK_RE.match(key):
        task, field = m.groups()
        label = _ZEROSHOT_TASKS.get(task, task)
        if field != "value":
            label = f"{label} ({field})"
        return MetricSpec(key, label, True, "acc")
    if m := _PPL_RE.match(key):
        return MetricSpec(key, _PPL_DATASETS.get(m.group(1), m.group(1)), False, "ppl")
    if m := _NONFINITE_RE.match(key):
        # A growing count of non-finite windows is a numerics regression, so lower is better.
        return MetricSpec(key, f"{m.group(1)} non-finite", False, "count")
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
    key = _ALIASES.get(name, name)
    if key in METRICS:
        return METRICS[key]
    # Task names that only appear in the store ("zeroshot.tasks.copa.value" -> "copa").
    for col in available:
        m = _TASK_RE.match(col)
        if m and m.group(2) == "value" and name in (m.group(1), f"zeroshot.{m.group(1)}"):
            key = col
            break
    spec = _pattern_spec(key)
    if spec is not None:
        return spec
    candidates = sorted(set(METRICS) | set(_ALIASES) | {c for c in available if is_metric_column(c)})
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownMetricError(
        f"unknown metric {name!r}.{hint} Known metrics: {', '.join(sorted(_ALIASES))} "
        "(or any dotted key such as 'zeroshot.tasks.<task>.value')."
    )


def is_metric_column(column: str) -> bool:
    """Whether a flattened frame column is a directional metric (not a protocol, count or stderr)."""
    if column in METRICS:
        return True
    if _NONFINITE_RE.match(column):
        return False  # only compared when asked for explicitly
    return _pattern_spec(column) is not None and not column.endswith(("_stderr",))


def metric_columns(columns: Iterable[str], include_task_variants: bool = False) -> list[str]:
    """The directional metric columns among ``columns``, in paper order.

    Perplexities come first, then zero-shot tasks (registered ones in paper order, others
    alphabetically), then the zero-shot average, then everything else (embedding fidelity).

    Args:
        columns: Frame columns.
        include_task_variants: Also return ``zeroshot.tasks.<t>.acc``/``acc_norm`` columns; by
            default only the reported ``value`` of each task is a metric column.

    Returns:
        Ordered list of metric keys.
    """
    cols = list(columns)
    present = [c for c in cols if is_metric_column(c)]
    if not include_task_variants:
        present = [c for c in present if not (_TASK_RE.match(c) and not c.endswith(".value"))]
    order = {k: i for i, k in enumerate(DEFAULT_METRIC_ORDER)}

    def sort_key(col: str) -> tuple[int, int, str]:
        if col in order:
            # Keep unregistered tasks between registered tasks and the average.
            if col == "zeroshot.average":
                return (2, 0, col)
            group = 0 if col.endswith(".ppl") else (1 if col.startswith("zeroshot.") else 3)
            return (group, order[col], col)
        if col.endswith(".ppl"):
            return (0, len(order), col)
        if col.startswith("zeroshot."):
            return (1, len(order), col)
        return (3, len(order), col)

    return sorted(present, key=sort_key)


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
