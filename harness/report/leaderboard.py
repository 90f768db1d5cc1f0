"""Paper-style leaderboards (Markdown, LaTeX, CSV) from the store frame.

Layout follows the SVD-compression papers (style notes C1): ``Ratio | Method | perplexities |
zero-shot tasks | Average``, rows grouped by ratio with the dense model first, a fixed method
order inside each group, and the best value of each group and column in bold (direction from
the metric registry, dense row excluded). Records evaluated with lm-eval ``--limit`` are refused
unless explicitly allowed, because their numbers are not comparable with full evaluations.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd
from tabulate import tabulate

from harness.report.cells import (
    LIMITED_MARK,
    LimitedRecordsError,
    cell_identity,
    cell_labels,
    check_limited,
    method_sort_key,
    protocol_columns,
    select_model,
)
from harness.report.metrics import MetricSpec, metric_columns, resolve_metric

__all__ = [
    "LimitedRecordsError",
    "LeaderboardTable",
    "RATIO_DEFINITION",
    "build_leaderboard",
    "render_leaderboard",
    "latex_escape",
]

logger = logging.getLogger(__name__)

RATIO_DEFINITION = "ratio = fraction of decoder-linear parameters removed"


def _fmt_ratio(ratio: float) -> str:
    return f"{ratio * 100:.4g}%"


@dataclass
class LeaderboardTable:
    """One model's leaderboard before rendering.

    Attributes:
        model: Model name.
        metrics: Column specs, in order.
        rows: One row per cell (seeds averaged): ``ratio``, ``method``, ``label``, ``is_dense``,
            ``n_seeds``, ``limited``, ``achieved_ratio`` and one column per metric key (raw values).
        bold: Same index as ``rows``, one boolean column per metric key.
        protocols: Metric key -> the protocol strings behind that column.
        caption: Human caption (ratio definition, model, bolding rule, protocols).
    """

    model: str
    metrics: list[MetricSpec]
    rows: pd.DataFrame
    bold: pd.DataFrame
    protocols: dict[str, list[str]] = field(default_factory=dict)
    caption: str = ""


def _resolve_metrics(frame: pd.DataFrame, metrics: Sequence[str] | None) -> list[MetricSpec]:
    if metrics:
        specs = [resolve_metric(m, frame.columns) for m in metrics]
        for s in specs:
            if s.key not in frame.columns or frame[s.key].isna().all():
                logger.warning("metric %s has no values for this model; its column will be empty", s.key)
        return list({s.key: s for s in specs}.values())
    keys = [k for k in metric_columns(frame.columns) if frame[k].notna().any()]
    if not keys:
        raise ValueError("no metric values in the selected records; nothing to tabulate")
    return [resolve_metric(k, frame.columns) for k in keys]


def _build_one(model: str, frame: pd.DataFrame, metrics: Sequence[str] | None) -> LeaderboardTable:
    specs = _resolve_metrics(frame, metrics)
    frame = frame.copy()
    for s in specs:
        # Coerce: a column that is None in every record arrives as object dtype and cannot be averaged.
        frame[s.key] = pd.to_numeric(frame[s.key], errors="coerce") if s.key in frame.columns else math.nan
    protocols: dict[str, list[str]] = {}
    for s in specs:
        present = frame[frame[s.key].notna()]
        for col in protocol_columns(s.key):
            if col not in present.columns:
                continue
            values = sorted({str(v) for v in present[col].dropna()})
            if len(values) > 1:
                raise ValueError(
                    f"{model}: column {s.key} mixes {col} values {values}; those numbers are not "
                    f"comparable. Filter the frame first, e.g. frame[frame[{col!r}] == {values[0]!r}]."
                )
            if values and col.endswith(".protocol"):
                protocols[s.key] = values
    frame["_identity"] = cell_identity(frame)
    frame["_ratio"] = frame["ratio"].round(6)
    frame["label"] = cell_labels(frame)
    keys = [s.key for s in specs]
    agg = {k: "mean" for k in keys}
    agg.update(method="first", label="first", limited="max", achieved_ratio="mean")
    frame["limited"] = frame["limited"].fillna(False).astype(bool)
    frame["achieved_ratio"] = pd.to_numeric(frame["achieved_ratio"], errors="coerce")
    by_cell = frame.groupby(["_ratio", "_identity"], sort=False)
    grouped = by_cell.agg(agg).reset_index()
    # n counts distinct seeds; re-runs of one seed (e.g. another harness version) are averaged too,
    # but must not pass for extra seeds.
    n_records = by_cell.size().to_numpy()
    grouped["n_seeds"] = by_cell["seed"].nunique().clip(lower=1).to_numpy()
    if (n_records > grouped["n_seeds"].to_numpy()).any():
        logger.warning("%s: some cells have several records for the same seed; averaging them", model)
    grouped["is_dense"] = grouped["method"] == "dense"
    grouped = grouped.rename(columns={"_ratio": "ratio"})
    # Dense first, then ratio groups ascending, then the fixed method order.
    order = sorted(
        range(len(grouped)),
        key=lambda i: (
            0 if grouped.at[i, "is_dense"] else 1,
            grouped.at[i, "ratio"],
            method_sort_key(grouped.at[i, "method"]),
            grouped.at[i, "label"],
        ),
    )
    columns = ["ratio", "method", "label", "is_dense", "n_seeds", "limited", "achieved_ratio", *keys]
    rows = grouped.iloc[order].reset_index(drop=True)[columns]
    bold = pd.DataFrame(False, index=rows.index, columns=keys)
    for _ratio, g in rows[~rows["is_dense"]].groupby("ratio", sort=False):
        for s in specs:
            vals = g[s.key].dropna()
            vals = vals[vals.map(math.isfinite)]
            if len(vals) < 2:  # a lone entry is not "best" of anything
                continue
            shown = vals.map(s.rounded)
            best = shown.max() if s.higher_is_better else shown.min()
            bold.loc[shown.index[shown == best], s.key] = True
    table = LeaderboardTable(model=model, metrics=specs, rows=rows, bold=bold, protocols=protocols)
    table.caption = _caption(table, frame)
    return table


def _caption(table: LeaderboardTable, frame: pd.DataFrame) -> str:
    parts = [
        f"{table.model}: {RATIO_DEFINITION} (0% = original dense model).",
        "Bold: best per ratio group and column (dense row excluded); ↓ lower is better, ↑ higher is better.",
    ]
    if any(s.kind == "acc" for s in table.metrics):
        parts.append("Zero-shot accuracies in %.")
        by_metric: dict[str, list[str]] = {}
        for s in table.metrics:
            col = s.key.rsplit(".", 1)[0] + ".metric"
            if s.key.startswith("zeroshot.tasks.") and col in frame.columns:
                for value in sorted({str(v) for v in frame[col].dropna()}):
                    by_metric.setdefault(value, []).append(s.label)
        if by_metric:
            listed = ", ".join(f"{m} ({', '.join(labels)})" for m, labels in by_metric.items())
            parts.append(f"Task metric: {listed}.")
    protos = sorted({p for ps in table.protocols.values() for p in ps})
    if protos:
        parts.append(f"Protocols: {', '.join(protos)}.")
    if (table.rows["n_seeds"] > 1).any():
        parts.append("(n=k): mean over k seeds.")
    if table.rows["limited"].astype(bool).any():
        parts.append(f"{LIMITED_MARK} evaluated with --limit (smoke run, not comparable).")
    return " ".join(parts)


def build_leaderboard(
    frame: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    allow_limited: bool = False,
    model: str | None = None,
) -> list[LeaderboardTable]:
    """Aggregate the store frame into one :class:`LeaderboardTable` per model.

    Args:
        frame: Store frame from :func:`harness.report.store.load_store`.
        metrics: Metric names/aliases for the columns; default: every registered metric with values.
        allow_limited: Include ``--limit`` smoke-run records (marked with †) instead of refusing.
        model: Restrict to one model (name or id); default: one table per model.

    Returns:
        The tables, sorted by model name.

    Raises:
        LimitedRecordsError: If limited records would be included and ``allow_limited`` is False.
        ValueError: Unknown model, empty store, or a column mixing evaluation protocols.
        UnknownMetricError: Unknown metric name (with close matches).
    """
    if "status" in frame:
        frame = frame[frame["status"].fillna("ok") == "ok"]
    tables = []
    for name, sub in select_model(frame, model):
        check_limited(sub, allow_limited)
        tables.append(_build_one(name, sub, metrics))
    return tables


def _group_keys(table: LeaderboardTable) -> list[str]:
    """Row-group key per row: the dense row is its own group, others group by ratio."""
    return [
        "dense" if d else repr(r) for d, r in zip(table.rows["is_dense"], table.rows["ratio"], strict=True)
    ]


def _cells(table: LeaderboardTable, bold: tuple[str, str], missing: str) -> list[list[str]]:
    out = []
    keys = _group_keys(table)
    for i, r in table.rows.iterrows():
        ratio = "0%" if r["is_dense"] else _fmt_ratio(r["ratio"])
        first = i == 0 or keys[i] != keys[i - 1]
        label = r["label"] + (f" (n={r['n_seeds']})" if r["n_seeds"] > 1 else "")
        label += LIMITED_MARK if r["limited"] else ""
        row = [ratio if first else "", label]
        for s in table.metrics:
            v = r[s.key]
            text = missing if pd.isna(v) else s.format(float(v))
            row.append(f"{bold[0]}{text}{bold[1]}" if table.bold.at[i, s.key] else text)
        out.append(row)
    return out


def _render_md(table: LeaderboardTable) -> str:
    headers = ["Ratio", "Method"] + [f"{s.label}{s.arrow}" for s in table.metrics]
    body = tabulate(
        _cells(table, ("**", "**"), "–"),
        headers=headers,
        tablefmt="pipe",
        disable_numparse=True,
        colalign=("left", "left") + ("right",) * len(table.metrics),
    )
    model, _, rest = table.caption.partition(": ")
    return f"**{model}**: {rest}\n\n{body}\n"


_LATEX_ESCAPES = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "↓": r"$\downarrow$",
    "↑": r"$\uparrow$",
    "†": r"$^\dagger$",
    "×": r"$\times$",
    "–": "--",
    "∞": r"$\infty$",
}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters and map the few Unicode symbols we emit to macros."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def _render_latex(table: LeaderboardTable) -> str:
    n = len(table.metrics)
    slug = re.sub(r"[^a-z0-9]+", "-", table.model.lower()).strip("-")
    header = " & ".join(["Ratio", "Method"] + [latex_escape(f"{s.label}{s.arrow}") for s in table.metrics])
    lines = [
        "% svdbench leaderboard; needs \\usepackage{booktabs} and \\usepackage{multirow}",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{latex_escape(table.caption)}}}",
        f"\\label{{tab:svdbench-{slug}}}",
        f"\\begin{{tabular}}{{l|l|{'r' * n}}}",
        "\\toprule",
        header + " \\\\",
    ]
    cells = _cells(table, ("\x00B", "\x00E"), "–")
    keys = _group_keys(table)
    for i, row in enumerate(cells):
        if row[0]:
            lines.append("\\midrule")
            span = keys.count(keys[i])
            ratio_cell = latex_escape(row[0])
            row[0] = f"\\multirow{{{span}}}{{*}}{{{ratio_cell}}}" if span > 1 else ratio_cell
        escaped = [latex_escape(c).replace("\x00B", "\\textbf{").replace("\x00E", "}") for c in row[1:]]
        lines.append(" & ".join([row[0], *escaped]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines) + "\n"


def _render_csv(tables: list[LeaderboardTable]) -> str:
    frames = []
    for t in tables:
        keys = [s.key for s in t.metrics]
        f = t.rows[["ratio", "method", "label", "n_seeds", "limited", "achieved_ratio", *keys]].copy()
        f.insert(0, "model", t.model)
        frames.append(f)
    buf = io.StringIO()
    pd.concat(frames, ignore_index=True).to_csv(buf, index=False, lineterminator="\n", float_format="%.10g")
    return buf.getvalue()


def render_leaderboard(
    frame: pd.DataFrame,
    fmt: str = "md",
    metrics: Sequence[str] | None = None,
    allow_limited: bool = False,
    model: str | None = None,
) -> str:
    """Render the paper-style leaderboard of a store frame.

    Args:
        frame: Store frame (:func:`harness.report.store.load_store`).
        fmt: ``"md"`` (pipe table with a bold caption line), ``"latex"`` (booktabs, multirow,
            ``\\textbf`` for best) or ``"csv"`` (raw numbers, one header, a ``model`` column).
        metrics: Metric names/aliases for the columns; default: every registered metric present.
        allow_limited: Accept records evaluated with ``--limit`` (marked †); refused by default.
        model: Only this model (name or id). With several models and no choice, md/latex render
            one table per model, separated by a blank line.

    Returns:
        The rendered text.

    Raises:
        LimitedRecordsError: ``--limit`` records present and ``allow_limited`` is False.
        ValueError: Unknown format or model, empty store, or mixed protocols within a column.
        UnknownMetricError: Unknown metric name.
    """
    if fmt not in ("md", "latex", "csv"):
        raise ValueError(f"unknown leaderboard format {fmt!r}; choose md, latex or csv")
    tables = build_leaderboard(frame, metrics=metrics, allow_limited=allow_limited, model=model)
    if fmt == "csv":
        return _render_csv(tables)
    render = _render_md if fmt == "md" else _render_latex
    return "\n".join(render(t) for t in tables)
