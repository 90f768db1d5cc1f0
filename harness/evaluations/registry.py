"""The evaluation registry: each evaluation is one :class:`Evaluation` object, registered once.

An evaluation holds everything the rest of svdbench needs to know about it: how it runs on an
in-memory (dense or compressed) model, whether it needs a causal LM, its preflight checks (run
before any weights load), its dense reference (computed once per run, before any cell), whether it
can run with the model's blocks streamed through the device, its options, and its metrics with
their direction and label. The CLI, the run engine, the sweep spec and the reports read this
registry; adding an evaluation is one module (or one test) that calls :func:`register_evaluation`.

A result lands in the record under ``metrics[name]`` and always carries a ``protocol`` id; its
flattened keys (``wikitext2.ppl``, ``zeroshot.tasks.piqa.value``) are the metric keys the reports
use, so a metric key's first component names the evaluation that owns it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from methods.registry import Registry

__all__ = [
    "EVALUATIONS",
    "EvalSettings",
    "Evaluation",
    "MetricSpec",
    "compute_references",
    "evaluation_of_key",
    "preflight",
    "register_evaluation",
    "resolve_options",
    "run_evaluations",
]


@dataclass(frozen=True)
class MetricSpec:
    """How one metric is labelled, compared and formatted.

    Attributes:
        key: Dotted key in the flattened record (``"wikitext2.ppl"``): evaluation name, then the
            path inside its result.
        label: Short column header without the direction arrow, e.g. ``"WikiText-2"``.
        higher_is_better: Direction used for bolding, ties and regression verdicts.
        kind: ``"ppl"`` (2 decimals, thousands separators), ``"acc"`` (fraction shown as a
            percentage), ``"score"`` (3 decimals) or ``"count"`` (integer).
        in_tables: Whether reports show it as a column by default (False: only when asked for,
            e.g. counts of non-finite windows).
    """

    key: str
    label: str
    higher_is_better: bool
    kind: str
    in_tables: bool = True

    @property
    def arrow(self) -> str:
        """The direction arrow used in table headers (↑ or ↓)."""
        return "↑" if self.higher_is_better else "↓"

    def display(self, value: float) -> float:
        """Value as shown in tables (accuracies become percentages)."""
        return value * 100.0 if self.kind == "acc" else value

    def format(self, value: float | None) -> str:
        """Format a raw value for a human table; NaN/None become an en dash (``"39,661.03"``, ``"61.00"``)."""
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


@dataclass
class EvalSettings:
    """Settings shared by the evaluations of one run.

    Attributes:
        seqlen: Perplexity window length.
        batch_size: Windows (or lm-eval requests) per forward.
        max_windows: Perplexity smoke limit (recorded in the protocol id), or None.
        limit: lm-eval ``--limit`` (recorded; such records are refused by leaderboards), or None.
        tasks: lm-eval task names for ``zeroshot`` (None = default set).
        seed: Seed handed to evaluations that sample.
        device: Where the model runs.
        cache: Per-run cache (tokenized texts, dense references) shared by all cells.
        forward: Set by the engine when the model does not fit on the device: batches of token
            windows -> logits, streaming the blocks (:mod:`harness.engine.offload`); None when the
            model is resident. Only evaluations with ``streamable=True`` see it.
        window_stride: Perplexity on every k-th window only (a named subset, ``:every{k}`` in the id).
        options: Evaluation name -> its resolved options (:func:`resolve_options`).
    """

    seqlen: int
    batch_size: int = 8
    max_windows: int | None = None
    limit: int | None = None
    tasks: tuple[str, ...] | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache: dict[str, Any] = field(default_factory=dict)
    forward: Callable[..., Any] | None = None
    window_stride: int | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


Run = Callable[[nn.Module, Any, EvalSettings], dict[str, Any]]
Reference = Callable[[nn.Module, Any, EvalSettings], None]


@dataclass(frozen=True)
class Evaluation:
    """One evaluation, everything about it in one place.

    Attributes:
        name: Registry name; the record holds its result under ``metrics[name]``.
        run: ``(model, tokenizer, settings) -> result dict`` (with a ``protocol`` id).
        metrics: Its metrics in display order (keys start with ``name + "."``).
        aliases: Short names -> metric keys (``{"wt2": "wikitext2.ppl"}``) for the report CLI.
        needs_causal_lm: Whether it needs next-token logits; an encoder is refused before loading.
        preflight: Check run before any weights load (data present, packages importable); raises.
        reference: Computes its dense reference into ``settings.cache``, once per run, on the dense
            model before any cell is compressed; None when it compares with nothing.
        streamable: Whether it can run with the blocks streamed through the device
            (``settings.forward``) when the model does not fit; otherwise it runs under CPU offload.
        options: Option name -> default value; a run sets them with ``--eval-option NAME.KEY=VALUE``
            or the sweep spec's ``eval.options``; they enter the run key and the record only when set.
        check_options: Validates the resolved option values (raises ``ValueError``) in the preflight,
            before any weights load; None when any value is accepted.
        pattern: Metric spec for keys of a known shape that are not listed in ``metrics`` (new
            zero-shot tasks), or None.
        pattern_position: Where such keys sort among ``metrics`` (a fractional index).
    """

    name: str
    run: Run
    metrics: tuple[MetricSpec, ...] = ()
    aliases: Mapping[str, str] = field(default_factory=dict)
    needs_causal_lm: bool = True
    preflight: Callable[[], None] | None = None
    reference: Reference | None = None
    streamable: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    check_options: Callable[[Mapping[str, Any]], Any] | None = None
    pattern: Callable[[str], MetricSpec | None] | None = None
    pattern_position: float = math.inf

    def __post_init__(self) -> None:
        for spec in self.metrics:
            if not spec.key.startswith(self.name + "."):
                raise ValueError(f"metric {spec.key!r} of evaluation {self.name!r} must start with {self.name + '.'!r}")

    def metric(self, key: str) -> MetricSpec | None:
        """The spec of ``key`` (listed, or of a known shape), or None."""
        for spec in self.metrics:
            if spec.key == key:
                return spec
        return self.pattern(key) if self.pattern is not None else None

    def position(self, key: str) -> float:
        """Sort position of ``key`` among this evaluation's metrics."""
        for i, spec in enumerate(self.metrics):
            if spec.key == key:
                return float(i)
        return self.pattern_position


EVALUATIONS: Registry[Evaluation] = Registry("evaluation")


def register_evaluation(evaluation: Evaluation) -> Evaluation:
    """Register ``evaluation`` under its name (a duplicate name is an error); returns it."""
    EVALUATIONS.register(evaluation.name, evaluation)
    return evaluation


def evaluation_of_key(key: str) -> Evaluation | None:
    """The registered evaluation owning a dotted metric key (its first component), or None."""
    name = key.split(".", 1)[0]
    return EVALUATIONS.get(name) if name in EVALUATIONS else None


def resolve_options(names: Sequence[str], given: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each named evaluation's options: its defaults updated with ``given``.

    Raises:
        ValueError: for options of an evaluation that is not run, or option names it does not declare.
    """
    for name, values in given.items():
        if name not in names:
            raise ValueError(f"options given for evaluation {name!r}, which this run does not evaluate ({', '.join(names)})")
        declared = EVALUATIONS.get(name).options
        unknown = sorted(set(values) - set(declared))
        if unknown:
            known = ", ".join(sorted(declared)) or "none"
            raise ValueError(f"evaluation {name!r} has no option {', '.join(map(repr, unknown))} (its options: {known})")
    return {name: {**EVALUATIONS.get(name).options, **given.get(name, {})} for name in names}


def preflight(names: Sequence[str], encoder: bool = False, options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Fail fast for unknown evaluations, bad options, missing data / packages, or an evaluation the
    model type cannot take (perplexity of an encoder), before loading a model."""
    for name in names:
        evaluation = EVALUATIONS.get(name)
        if encoder and evaluation.needs_causal_lm:
            raise ValueError(f"evaluation {name!r} needs a causal LM, but the model is an encoder; use --eval embed-fidelity")
        if evaluation.preflight is not None:
            evaluation.preflight()
    for name, values in resolve_options(names, options or {}).items():
        check = EVALUATIONS.get(name).check_options
        if check is not None:
            check(values)


def compute_references(names: Sequence[str], model: nn.Module, tokenizer: Any, settings: EvalSettings) -> None:
    """Dense-model references of the named evaluations (no-op for those without one)."""
    model.eval()
    for name in names:
        reference = EVALUATIONS.get(name).reference
        if reference is not None:
            reference(model, tokenizer, settings)


def run_evaluations(names: Sequence[str], model: nn.Module, tokenizer: Any, settings: EvalSettings) -> dict[str, Any]:
    """Run each named evaluation; returns ``{name: result}``."""
    model.eval()
    return {name: EVALUATIONS.get(name).run(model, tokenizer, settings) for name in names}
