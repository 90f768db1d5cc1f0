"""Rank agreement: do two metrics (or two models) order the methods the same way?

For one ratio, the methods (seed-mean entries of :func:`harness.report.leaderboard.build_leaderboard`,
dense excluded) are ranked by metric A and by metric B, best first (each metric's own direction),
equal values sharing their average rank. The agreement is

* Spearman's rho: the Pearson correlation of the two rank vectors (average ranks for ties);
* Kendall's tau-b: ``(C − D) / sqrt((P − T_a)(P − T_b))`` over the ``P = n(n − 1)/2`` pairs, with
  ``C``/``D`` the pairs both metrics order alike / oppositely and ``T_a``/``T_b`` the pairs tied in A / B;
* the discordant pairs: the methods the two metrics order oppositely.

Both are 1 for the same order, −1 for the reversed one, and undefined (NaN) when a metric ties every
method. Entries are matched by method string, so the same function compares perplexity with the
zero-shot average on one model, or one metric on two models.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd
from tabulate import tabulate

from harness.report.leaderboard import LeaderboardTable, build_leaderboard
from harness.report.metrics import MetricSpec, resolve_metric
from harness.report.spread import Estimate, format_estimate

__all__ = [
    "RankAgreement",
    "average_ranks",
    "spearman_rho",
    "kendall_tau",
    "rank_agreement",
    "agreement",
    "render_agreement",
]


def average_ranks(values: Sequence[float]) -> list[float]:
    """Ranks 1..n of ``values`` in ascending order; equal values share the mean of their ranks."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for j in range(start, end + 1):
            ranks[order[j]] = (start + end) / 2 + 1  # positions start..end hold ranks start+1..end+1
        start = end + 1
    return ranks


def _check_pair(x: Sequence[float], y: Sequence[float]) -> None:
    if len(x) != len(y):
        raise ValueError(f"rank agreement needs two equally long lists, got {len(x)} and {len(y)} values")
    if len(x) < 2:
        raise ValueError(f"rank agreement needs at least two methods, got {len(x)}")


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho of two paired samples (Pearson correlation of their average ranks); NaN when
    either sample is constant."""
    _check_pair(x, y)
    rx, ry = average_ranks(x), average_ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b of two paired samples (ties counted as in the module docstring); NaN when
    either sample is constant."""
    _check_pair(x, y)
    n = len(x)
    concordant = discordant = tied_x = tied_y = 0
    for i in range(n):
        for j in range(i + 1, n):
            sx, sy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
            tied_x += sx == 0
            tied_y += sy == 0
            concordant += sx * sy > 0
            discordant += sx * sy < 0
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return (concordant - discordant) / denominator if denominator > 0 else math.nan


@dataclass(frozen=True)
class RankAgreement:
    """How two rankings of one ratio's methods agree.

    Attributes:
        ratio: The ratio compared.
        model_a, model_b: The models behind each ranking (equal for two metrics of one model).
        metric_a, metric_b: The metrics.
        methods: Method strings, in metric A's order (best first).
        labels: Display labels of ``methods``.
        values_a, values_b: Seed means, raw units.
        ranks_a, ranks_b: Average ranks, 1 = best.
        rho: Spearman's rho.
        tau: Kendall's tau-b.
        discordant: ``(m1, m2)`` display labels: A ranks ``m1`` better, B ranks ``m2`` better.
        left_out: Labels of methods without a value in one of the rankings.
    """

    ratio: float
    model_a: str
    model_b: str
    metric_a: MetricSpec
    metric_b: MetricSpec
    methods: list[str]
    labels: list[str]
    values_a: list[float]
    values_b: list[float]
    ranks_a: list[float]
    ranks_b: list[float]
    rho: float
    tau: float
    discordant: list[tuple[str, str]]
    left_out: list[str]

    def side(self, which: str) -> str:
        """``"WikiText-2↓"`` for one model, ``"WikiText-2↓ (model)"`` when the models differ."""
        spec, model = (self.metric_a, self.model_a) if which == "a" else (self.metric_b, self.model_b)
        return spec.label + spec.arrow + ("" if self.model_a == self.model_b else f" ({model})")

    def to_markdown(self) -> str:
        """The two rankings side by side, with rho, tau and the pairs ordered differently."""
        rows = [
            [label, _value(self.metric_a, va), f"{ra:g}", _value(self.metric_b, vb), f"{rb:g}"]
            for label, va, ra, vb, rb in zip(
                self.labels, self.values_a, self.ranks_a, self.values_b, self.ranks_b, strict=True
            )
        ]
        table = tabulate(
            rows, headers=["Method", self.side("a"), "rank", self.side("b"), "rank"], tablefmt="pipe",
            disable_numparse=True, colalign=("left", "right", "right", "right", "right"),
        )
        lines = [
            f"**{_title(self)}**: Spearman ρ = {_num(self.rho)}, Kendall τ = {_num(self.tau)} "
            f"({len(self.methods)} methods, dense excluded).",
            "",
            table,
            "",
            f"Ordered differently: {_pairs(self)}.",
        ]
        if self.left_out:
            lines.append(f"Left out (no value in one ranking): {', '.join(self.left_out)}.")
        return "\n".join(lines) + "\n"


def _value(spec: MetricSpec, mean: float) -> str:
    """A seed mean as the leaderboard prints it (compact notation for collapsed perplexities)."""
    return format_estimate(spec, Estimate(mean, None, 1))


def _num(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.2f}"


def _title(r: RankAgreement) -> str:
    model = r.model_a if r.model_a == r.model_b else f"{r.model_a} vs {r.model_b}"
    return f"{model}, ratio {r.ratio * 100:.4g}%: {r.side('a')} vs {r.side('b')}"


def _pairs(r: RankAgreement) -> str:
    return "; ".join(f"{a} > {b} by A, {b} > {a} by B" for a, b in r.discordant) or "none"


def _entries(table: LeaderboardTable, spec: MetricSpec, ratio: float) -> dict[str, tuple[str, float]]:
    """Method string -> (label, seed mean) of the table's usable entries at ``ratio``, dense excluded."""
    at = table.methods_at(ratio)
    if spec.key not in at.columns:
        return {}
    return {
        str(r["method"]): (str(r["label"]), float(r[spec.key])) for _, r in at.iterrows() if pd.notna(r[spec.key])
    }


def rank_agreement(
    table_a: LeaderboardTable, metric_a: str, ratio: float,
    table_b: LeaderboardTable | None = None, metric_b: str | None = None,
) -> RankAgreement:
    """Rank the methods of one ratio by two metrics (or on two models) and measure the agreement.

    Args:
        table_a: A model's table (:func:`harness.report.leaderboard.build_leaderboard`) holding ``metric_a``.
        metric_a: Metric name or alias (``wikitext2``, ``average``, ...).
        ratio: The ratio (e.g. 0.4).
        table_b: The table of the second ranking; default ``table_a`` (two metrics of one model).
        metric_b: Its metric; default ``metric_a`` (one metric on two models).

    Returns:
        The :class:`RankAgreement` over the methods present in both rankings.

    Raises:
        ValueError: Fewer than two common methods, a method with several entries at the ratio, or
            the same metric on the same table (nothing to compare).
        UnknownMetricError: An unknown metric name.
    """
    table_b = table_a if table_b is None else table_b
    metric_b = metric_a if metric_b is None else metric_b
    spec_a = resolve_metric(metric_a, [s.key for s in table_a.metrics])
    spec_b = resolve_metric(metric_b, [s.key for s in table_b.metrics])
    if table_b is table_a and spec_a.key == spec_b.key:
        raise ValueError(f"rank agreement of {spec_a.key} with itself on {table_a.model}: give a second metric or model")
    a, b = _entries(table_a, spec_a, ratio), _entries(table_b, spec_b, ratio)
    common = [m for m in a if m in b]
    if len(common) < 2:
        raise ValueError(
            f"ratio {ratio:g}: {len(common)} method(s) have both {spec_a.key} ({table_a.model}) and "
            f"{spec_b.key} ({table_b.model}); a ranking needs at least two"
        )
    # Rank "badness" so that rank 1 is the best under each metric's own direction.
    badness_a = [-a[m][1] if spec_a.higher_is_better else a[m][1] for m in common]
    badness_b = [-b[m][1] if spec_b.higher_is_better else b[m][1] for m in common]
    ranks_a, ranks_b = average_ranks(badness_a), average_ranks(badness_b)
    order = sorted(range(len(common)), key=lambda i: (ranks_a[i], ranks_b[i]))
    labels = {m: a[m][0] for m in common}
    # ``order`` sorts by A's rank, so in a discordant pair the first is the one A ranks better.
    discordant = [
        (labels[common[i]], labels[common[j]])
        for k, i in enumerate(order) for j in order[k + 1:]
        if _sign(ranks_a[i] - ranks_a[j]) * _sign(ranks_b[i] - ranks_b[j]) < 0
    ]
    left_out = sorted({a[m][0] for m in a if m not in b} | {b[m][0] for m in b if m not in a})
    return RankAgreement(
        ratio=ratio, model_a=table_a.model, model_b=table_b.model, metric_a=spec_a, metric_b=spec_b,
        methods=[common[i] for i in order], labels=[labels[common[i]] for i in order],
        values_a=[a[common[i]][1] for i in order], values_b=[b[common[i]][1] for i in order],
        ranks_a=[ranks_a[i] for i in order], ranks_b=[ranks_b[i] for i in order],
        rho=spearman_rho(badness_a, badness_b), tau=kendall_tau(badness_a, badness_b),
        discordant=discordant, left_out=left_out,
    )


def agreement(
    frame: pd.DataFrame,
    metric_a: str,
    metric_b: str | None = None,
    *,
    ratio: float | None = None,
    models: Sequence[str] | None = None,
    allow_limited: bool = False,
) -> list[RankAgreement]:
    """Rank agreement straight from a store frame, for every ratio (or one).

    Args:
        frame: Store frame (:func:`harness.report.store.load_store`).
        metric_a: First metric.
        metric_b: Second metric; default ``metric_a`` (then ``models`` must name two models).
        ratio: Only this ratio; default every ratio with at least two methods in both rankings.
        models: ``[model]`` or ``[model_a, model_b]`` (names or ids); default every model of the
            store, each on its own (two metrics of one model).
        allow_limited: Accept ``--limit`` smoke records.

    Returns:
        One :class:`RankAgreement` per model (or model pair) and ratio.

    Raises:
        ValueError: Nothing to compare (see :func:`rank_agreement`), or a bad ``models`` list.
    """
    metric_b = metric_a if metric_b is None else metric_b
    metrics = list(dict.fromkeys([metric_a, metric_b]))
    if models is not None and len(models) not in (1, 2):
        raise ValueError(f"models: give one model or two to compare, got {len(models)}")
    if models is not None and len(models) == 2:
        (ta,) = build_leaderboard(frame, metrics=[metric_a], allow_limited=allow_limited, model=models[0])
        (tb,) = build_leaderboard(frame, metrics=[metric_b], allow_limited=allow_limited, model=models[1])
        pairs = [(ta, tb)]
    else:
        if metric_a == metric_b:
            raise ValueError(f"one metric ({metric_a}) compares two models: give them (models=[A, B], --agreement-models A,B)")
        model = models[0] if models else None
        pairs = [(t, t) for t in build_leaderboard(frame, metrics=metrics, allow_limited=allow_limited, model=model)]
    out = []
    for ta, tb in pairs:
        ratios = [ratio] if ratio is not None else sorted(set(ta.rows.loc[~ta.rows["is_dense"], "ratio"]))
        for r in ratios:
            try:
                out.append(rank_agreement(ta, metric_a, float(r), tb, metric_b))
            except ValueError:
                if ratio is not None:
                    raise  # the one ratio asked for: say why there is no answer
    if not out:
        raise ValueError(f"no ratio has two methods with both {metric_a} and {metric_b}; nothing to rank")
    return out


def render_agreement(results: Sequence[RankAgreement], fmt: str = "md") -> str:
    """A summary table (one row per model and ratio), then, in Markdown, each ranking in detail.

    Args:
        results: From :func:`agreement` or :func:`rank_agreement`.
        fmt: ``"md"`` or ``"csv"`` (one row per result: models, metrics, ratio, n, rho, tau, the
            discordant pairs joined with ``;``).
    """
    if fmt not in ("md", "csv"):
        raise ValueError(f"rank agreement renders as md or csv, not {fmt!r}")
    rows = [
        {
            "model_a": r.model_a, "model_b": r.model_b, "metric_a": r.metric_a.key, "metric_b": r.metric_b.key,
            "ratio": r.ratio, "n": len(r.methods), "rho": r.rho, "tau": r.tau,
            "discordant": "; ".join(f"{a} > {b}" for a, b in r.discordant),
        }
        for r in results
    ]
    if fmt == "csv":
        buf = io.StringIO()
        pd.DataFrame(rows).to_csv(buf, index=False, lineterminator="\n", float_format="%.6g")
        return buf.getvalue()
    summary = tabulate(
        [[_title(r), len(r.methods), _num(r.rho), _num(r.tau), len(r.discordant)] for r in results],
        headers=["Rankings", "n", "Spearman ρ", "Kendall τ", "pairs ordered differently"],
        tablefmt="pipe", disable_numparse=True, colalign=("left", "right", "right", "right", "right"),
    )
    notes = (
        "Methods ranked per ratio by their seed means (dense excluded), 1 = best in each metric's direction, "
        "ties sharing the average rank; ρ = Spearman, τ = Kendall's tau-b."
    )
    return "\n".join([summary, "", notes, "", *(r.to_markdown() for r in results)])
