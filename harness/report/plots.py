"""Paper figures from the result store: PPL/accuracy vs ratio, per-layer rank allocation, spectra.

All figures use :mod:`harness.report.style` (column width, TrueType fonts, one colour and marker
per method) and are written as PDF + 300 dpi PNG with the git sha and sweep id in the metadata.
``spectra`` is the exception to "everything comes from the records": singular values are too big
for a record, so the engine dumps them to a separate JSON/npz file (format in :func:`load_spectra`).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter, PercentFormatter

from harness.report import style
from harness.report.entries import (
    check_limited,
    entry_identity,
    entry_labels,
    method_footnotes,
    method_sort_key,
    protocol_columns,
    select_model,
    superscript,
)
from harness.report.metrics import MetricSpec, resolve_metric
from harness.report.spectra import load_spectra, spectra_figure
from harness.report.spread import SPREAD_NAME, Estimate, estimate
from harness.report.staleness import stale_reasons
from harness.report.store import as_frame, value_text

__all__ = ["PLOT_KINDS", "plot", "load_spectra"]

logger = logging.getLogger(__name__)

PLOT_KINDS: tuple[str, ...] = ("ppl-vs-ratio", "zeroshot-vs-ratio", "metric-vs-ratio", "rank-allocation", "spectra")
_VS_RATIO = ("ppl-vs-ratio", "zeroshot-vs-ratio", "metric-vs-ratio")
ERROR_BARS = f"±1 {SPREAD_NAME} over seeds, where an entry has two or more seeds"
RATIO_LABEL = "Compression ratio (params removed)"
# Projection panels in architecture order (Llama/Mistral/Qwen, then OPT); others follow alphabetically.
_KIND_ORDER = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "out_proj",
    "fc1",
    "fc2",
]


def _kind_rank(kind: str) -> tuple[int, str]:
    """Sort key of a projection kind: architecture order by its last part (``self_attn.q_proj``)."""
    last = kind.rsplit(".", 1)[-1]
    return (_KIND_ORDER.index(last) if last in _KIND_ORDER else len(_KIND_ORDER), kind)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower() or "model"


def _plain_number(value: float, _pos: int | None = None) -> str:
    """Tick text without exponents: 5, 20, 1,000, 10,000 (readers compare against tables)."""
    if value >= 10 and abs(value - round(value)) > 1e-6 * value:
        return f"{value:,.1f}"  # never round a tick's label to a value it does not sit at (202.5 is not 202)
    if value >= 1000:
        return f"{value:,.0f}"
    return f"{value:.0f}" if value >= 10 else f"{value:g}"


def _readable_log_y(ax: Any) -> None:
    """Log y ticks with plain labels, denser when the data span few decades."""
    lo, hi = ax.get_ylim()
    decades = math.log10(hi / lo) if lo > 0 else 3.0
    if decades < 0.3:
        # Under a factor of 2 a log axis has at most one decade tick: use round linear steps instead.
        ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 5, 10]))
        ax.yaxis.set_major_formatter(FuncFormatter(_plain_number))
        ax.yaxis.set_minor_formatter(NullFormatter())
        return
    subs = (1.0,) if decades > 2.5 else (1.0, 2.0, 5.0) if decades > 0.9 else (1.0, 1.5, 2.0, 3.0, 5.0, 7.0)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(FuncFormatter(_plain_number))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _ylabel(spec: MetricSpec) -> str:
    if spec.key == "zeroshot.average":
        return "Avg. zero-shot accuracy (%)"
    if spec.kind == "ppl":
        return f"{spec.label} perplexity"
    return f"{spec.label} accuracy (%)" if spec.kind == "acc" else spec.label


def _series(frame: pd.DataFrame) -> list[tuple[str, str, pd.DataFrame]]:
    """Split non-dense rows into (method, label, rows) series, one per entry identity, in method order."""
    rows = frame[frame["method"] != "dense"].copy()
    if rows.empty:
        return []
    rows["_identity"] = entry_identity(rows)
    rows["_label"] = entry_labels(rows)
    out = [
        (str(g["method"].iloc[0]), str(g["_label"].iloc[0]), g)
        for _, g in rows.groupby("_identity", sort=False)
    ]
    return sorted(out, key=lambda t: (method_sort_key(t[0]), t[1]))


def _style_for(method: str, label: str, seen: dict[str, int]) -> dict[str, Any]:
    kw = style.method_style(method).kwargs()
    kw["label"] = label if label != style.method_style(method).label else kw["label"]
    # Two configurations of one method would otherwise be drawn identically.
    n = seen.get(method, 0)
    seen[method] = n + 1
    if n:
        kw["linestyle"] = ["--", "-.", ":"][(n - 1) % 3]
    return kw


def _ratio_estimates(g: pd.DataFrame, key: str) -> list[tuple[float, Estimate]]:
    """(ratio, estimate over seeds) of one series, by ratio; re-runs of a seed are averaged first."""
    vals = g[["ratio", "seed", key]].copy()
    vals["seed"] = vals["seed"].map(value_text)
    per_seed = vals.groupby(["ratio", "seed"])[key].mean()
    return [(float(r), estimate(s.tolist())) for r, s in per_seed.groupby(level=0, sort=True)]


CHANCE_STYLE: dict[str, Any] = {"color": "0.45", "linestyle": ":", "linewidth": 1.0, "marker": "", "label": "Chance"}


def _metric_vs_ratio(
    frame: pd.DataFrame, model: str, spec: MetricSpec, ylabel: str, log_y: bool, chance: float | None = None
) -> Any:
    """Metric (mean over seeds) against ratio, one line per method, error bars ± s where n >= 2; the
    dense model as a horizontal reference line, and ``chance`` (raw units) as a dotted one when given."""
    series = _series(frame)
    # The legend sits above the axes in three columns; grow the figure with it, not shrink the axes.
    legend_rows = math.ceil((len(series) + 1) / 3)
    fig, axes = style.new_figure(figsize=(style.COLUMN_WIDTH_IN, 1.85 + 0.16 * legend_rows))
    ax = axes[0, 0]
    seen: dict[str, int] = {}
    ratios: set[float] = set()
    for method, label, g in series:
        vals = g[["ratio", "seed", spec.key]].copy()
        vals[spec.key] = pd.to_numeric(vals[spec.key], errors="coerce")
        vals = vals.dropna(subset=[spec.key])
        bad = ~vals[spec.key].map(math.isfinite)
        if bad.any():
            logger.warning(
                "%s %s: %d non-finite %s value(s) not plotted", model, label, int(bad.sum()), spec.key
            )
            vals = vals[~bad]
        if vals.empty:
            continue
        points = _ratio_estimates(vals, spec.key)
        x = np.array([r for r, _ in points])
        y = np.array([spec.display(e.mean) for _, e in points])
        ratios.update(x.tolist())
        ax.plot(x, y, **_style_for(method, label, seen))
        # Error bars only where there is a spread (two or more seeds): one seed gets none, never a made-up one.
        spread = [(r, spec.display(e.mean), abs(spec.display(e.spread))) for r, e in points if e.spread is not None]
        if spread:
            ex, ey, err = (np.array(v) for v in zip(*spread, strict=True))
            ax.errorbar(
                ex, ey, yerr=err, fmt="none", ecolor=ax.lines[-1].get_color(), elinewidth=0.8, capsize=1.5,
                label="_nolegend_",
            )
    dense = frame.loc[frame["method"] == "dense", spec.key].dropna()
    if not dense.empty:
        ax.axhline(
            spec.display(float(dense.mean())), **{**style.METHOD_STYLES["dense"].kwargs(), "linewidth": 1.0}
        )
    if not ax.lines:
        raise ValueError(f"{model}: no {spec.key} values to plot")
    if chance is not None:
        # A floor, not data: drawn after the check so that it never makes an empty figure look full.
        ax.axhline(spec.display(chance), **CHANCE_STYLE)
    if log_y:
        ax.set_yscale("log")
        _readable_log_y(ax)
    ax.set_xticks(sorted(ratios))
    ax.xaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.set_xlabel(RATIO_LABEL)
    ax.set_ylabel(ylabel)
    # No title: paper figures are captioned in LaTeX; the model is in the file name and metadata.
    fig.legend(loc="outside upper center", ncol=3, columnspacing=1.0, handletextpad=0.4)
    return fig


def _check_chance(spec: MetricSpec, chance: float | None) -> None:
    """A chance level belongs to an accuracy and is a fraction, as the records store accuracies."""
    if chance is None:
        return
    if spec.kind != "acc":
        raise ValueError(f"chance={chance!r}: a chance level needs an accuracy figure, but {spec.key} is a {spec.kind} metric")
    if not 0.0 <= chance <= 1.0:
        raise ValueError(f"chance={chance!r}: give the chance level as a fraction in [0, 1] (0.25, not 25)")


def _figure_notes(frame: pd.DataFrame, spec: MetricSpec, chance: float | None) -> dict[str, str]:
    """Metadata that a caption needs: the protocol, the method footnotes of the legend, the chance level."""
    notes: dict[str, str] = {}
    col = protocol_columns(spec.key)[0]
    if col in frame:
        protocols = sorted({str(p) for p in frame.loc[frame[spec.key].notna(), col].dropna()})
        if protocols:
            notes["protocol"] = ",".join(protocols)
    footnotes = method_footnotes(frame.loc[frame["method"] != "dense", "method"])
    if footnotes:
        notes["methods"] = "; ".join(f"{superscript(n)} {m}" for m, n in footnotes.items())
    if chance is not None:
        notes["chance"] = f"{chance:g}"
    return notes


def _layer_rows(frame: pd.DataFrame, value: str) -> pd.DataFrame:
    rows = []
    for method, label, g in _series(frame):
        for layers in g["layers"]:
            for lay in layers or []:
                v = lay.get(value)
                if v is None and value == "keep" and lay.get("rank") is not None and lay.get("shape"):
                    m, n = lay["shape"]
                    v = lay["rank"] * (m + n) / (m * n)
                if v is None:
                    continue
                rows.append(
                    {
                        "method": method,
                        "label": label,
                        "block": lay.get("block"),
                        "kind": lay.get("kind"),
                        "v": v,
                    }
                )
    return pd.DataFrame(rows, columns=["method", "label", "block", "kind", "v"])


def _pick_ratio(frame: pd.DataFrame) -> float:
    """Default ratio for rank allocation: most methods with layer data; ties -> the larger ratio."""
    has_layers = frame[(frame["method"] != "dense") & frame["layers"].map(lambda x: bool(x))]
    if has_layers.empty:
        raise ValueError("no records with per-layer data (layers[]); nothing to plot for rank-allocation")
    counts = has_layers.groupby("ratio")["method"].nunique()
    best = max(counts.index, key=lambda r: (counts[r], r))
    logger.info("rank-allocation: using ratio %.3g (%d methods); pass ratio= to choose", best, counts[best])
    return float(best)


def _rank_allocation(frame: pd.DataFrame, model: str, ratio: float, value: str) -> Any:
    sub = frame[np.isclose(frame["ratio"].astype(float), ratio)]
    data = _layer_rows(sub, value)
    if data.empty:
        raise ValueError(f"{model}: no per-layer data at ratio {ratio:g}")
    kinds = sorted(
        data["kind"].dropna().unique(), key=_kind_rank
    )
    ncols = min(len(kinds), 4)
    nrows = math.ceil(len(kinds) / ncols)
    width = style.PAGE_WIDTH_IN if ncols > 2 else style.COLUMN_WIDTH_IN
    fig, axes = style.new_figure(nrows, ncols, figsize=(width, 0.3 + 1.35 * nrows), sharex=True, sharey=True)
    # Series: (method, label) -> {kind: per-block values}, in method order.
    curves: dict[tuple[str, str], dict[str, pd.Series]] = {}
    for (method, label), g in data.groupby(["method", "label"], sort=False):
        curves[(method, label)] = {
            k: gk.groupby("block")["v"].mean().sort_index() for k, gk in g.groupby("kind")
        }
    order = sorted(curves, key=lambda t: (method_sort_key(t[0]), t[1]))
    # Allocators often coincide (every uniform method is the same flat line) and overlapping lines
    # would hide each other: draw identical allocations once, with all their methods in the label.
    merged: dict[tuple, list[tuple[str, str]]] = {}
    for key in order:
        fingerprint = tuple(
            (k, tuple(np.round(v.index.to_numpy(float), 6)), tuple(np.round(v.to_numpy(float), 9)))
            for k, v in sorted(curves[key].items())
        )
        merged.setdefault(fingerprint, []).append(key)
    n_blocks = int(data["block"].nunique())
    seen: dict[str, int] = {}
    for members in merged.values():
        kw = _style_for(*members[0], seen)
        if len(members) > 1:
            kw["label"] = " = ".join(_style_for(m, lbl, {})["label"] for m, lbl in members)
        # Markers help up to ~16 blocks; beyond that they merge into a thick line.
        kw.update(
            drawstyle="steps-mid",  # a rank is per block: steps, not slopes between blocks
            markersize=3.2 if n_blocks <= 16 else 0,
            markerfacecolor="none",
            markeredgewidth=0.8,
            linewidth=1.0,
        )
        for ax, kind in zip(axes.flat, kinds, strict=False):
            pts = curves[members[0]].get(kind)
            if pts is not None:
                ax.plot(
                    pts.index, pts.to_numpy(), **{**kw, "label": kw["label"] if ax is axes.flat[0] else None}
                )
    for i, ax in enumerate(axes.flat):
        if i >= len(kinds):
            ax.set_visible(False)
            continue
        ax.set_title(kinds[i], fontsize=8, pad=2)
        if i % ncols == 0:
            ax.set_ylabel("Kept fraction" if value == "keep" else value.capitalize())
        if i >= len(kinds) - ncols:
            ax.set_xlabel("Block")
            ax.xaxis.set_tick_params(labelbottom=True)
    if value == "keep":
        axes.flat[0].set_ylim(bottom=0)
    fig.legend(
        loc="outside upper center",
        ncol=min(len(merged), 4),
        columnspacing=1.0,
        handletextpad=0.4,
        title=f"{model}, ratio {ratio * 100:.4g}%",
        title_fontsize=8,
    )
    return fig


def _drop_stale(frame: pd.DataFrame) -> pd.DataFrame:
    """Leave out stale records (:mod:`harness.report.staleness`): figures never draw their numbers."""
    if frame.empty:
        return frame
    reasons = stale_reasons(frame)
    for idx in reasons.index[reasons.notna()]:
        logger.warning("not plotting stale record %s: %s", frame.at[idx, "source_file"] or frame.at[idx, "run_key"], reasons[idx])
    return frame[reasons.isna()]


def plot(
    source: pd.DataFrame | str | Path | Sequence[Mapping[str, Any]] | None,
    kind: str,
    out_dir: str | Path,
    *,
    model: str | None = None,
    metric: str | None = None,
    ratio: float | None = None,
    value: str = "keep",
    spectra: str | Path | None = None,
    layers: Sequence[str] | None = None,
    git_sha: str | None = None,
    sweep_id: str | None = None,
    allow_limited: bool = False,
    chance: float | None = None,
) -> list[Path]:
    """Render one kind of figure (one per model) as PDF + PNG.

    Args:
        source: Store frame, results directory or records. For ``spectra``: the spectra file
            (or None when ``spectra=`` is given).
        kind: One of :data:`PLOT_KINDS`.
        out_dir: Output directory (created).
        model: Only this model; default: one figure per model.
        metric: For ``ppl-vs-ratio`` (default ``wikitext2``), ``zeroshot-vs-ratio`` (default
            ``average``) and ``metric-vs-ratio`` (required; any metric, e.g. ``embed-fidelity``):
            the plotted metric name or alias. These figures draw the mean over seeds with error
            bars of ±1 sample standard deviation where an entry has two or more seeds.
        ratio: For ``rank-allocation``: the ratio shown (default: the one most methods share).
        value: For ``rank-allocation``: ``"keep"`` (kept fraction per matrix) or ``"rank"``.
        spectra: For ``spectra``: path of the JSON/npz dump (see :func:`load_spectra`).
        layers: For ``spectra``: layer names to show (default: four spread over the model).
        git_sha: Recorded in the metadata; default: ``git rev-parse HEAD`` of this checkout.
        sweep_id: Recorded in the metadata; default: the records' ``sweep_id`` values, if any.
        allow_limited: Plot records evaluated with ``--limit`` instead of refusing.
        chance: For accuracy figures (``zeroshot-vs-ratio``, or ``metric-vs-ratio`` of an
            accuracy): the chance level as a fraction (e.g. the mean over the tasks of 1 / number
            of choices), drawn as a dotted line. The records do not know it, so the caller says.

    Returns:
        The written paths (PDF then PNG for each figure).

    Raises:
        ValueError: Unknown kind or nothing to plot. LimitedRecordsError: see ``allow_limited``.
    """
    if kind not in PLOT_KINDS:
        raise ValueError(f"unknown plot kind {kind!r}; choose one of {', '.join(PLOT_KINDS)}")
    sha = git_sha or style.git_sha()
    written: list[Path] = []
    with style.paper_style():
        if kind == "spectra":
            path = Path(spectra if spectra is not None else source)  # type: ignore[arg-type]
            fig = spectra_figure(load_spectra(path), layers)
            return style.save_figure(
                fig,
                out_dir,
                f"spectra_{_slug(path.stem)}",
                sha=sha,
                sweep_id=sweep_id,
                title=f"Singular-value spectra ({path.name})",
                extra={"source": path.name},
            )
        if source is None:
            raise ValueError(f"plot kind {kind!r} needs a store frame, a results directory or records")
        frame = as_frame(source)  # type: ignore[arg-type]
        if "status" in frame:
            frame = frame[frame["status"].fillna("ok") == "ok"]
        frame = _drop_stale(frame)
        for name, sub in select_model(frame, model):
            check_limited(sub, allow_limited, what="a figure")
            sweep = sweep_id or "+".join(sorted({str(s) for s in sub["sweep_id"].dropna()})) or None
            extra = {
                "model": name,
                "records_git_sha": ",".join(sorted({str(s)[:12] for s in sub["git_sha"].dropna()})[:3]),
            }
            if kind in _VS_RATIO:
                if kind == "metric-vs-ratio" and metric is None:
                    raise ValueError("metric-vs-ratio needs a metric (e.g. metric='embed-fidelity')")
                spec = resolve_metric(
                    metric or ("wikitext2" if kind == "ppl-vs-ratio" else "average"), sub.columns
                )
                extra["error_bars"] = ERROR_BARS
                if spec.key not in sub.columns:
                    raise ValueError(f"{name}: the store has no {spec.key} values")
                _check_chance(spec, chance)
                extra.update(_figure_notes(sub, spec, chance))
                fig = _metric_vs_ratio(sub, name, spec, _ylabel(spec), log_y=spec.kind == "ppl", chance=chance)
                # File tag: the dataset for perplexities, the task or field otherwise.
                parts = spec.key.split(".")
                tag = parts[0] if spec.kind == "ppl" else parts[-2] if parts[-1] == "value" else parts[-1]
                if kind == "metric-vs-ratio":
                    tag = spec.key  # any metric: the full key keeps two groups' fields apart
                stem = f"{kind}_{_slug(tag)}_{_slug(name)}"
            else:
                r = ratio if ratio is not None else _pick_ratio(sub)
                fig = _rank_allocation(sub, name, r, value)
                stem = f"rank-allocation_{_slug(name)}_r{round(r * 100):02d}"
            written += style.save_figure(
                fig, out_dir, stem, sha=sha, sweep_id=sweep, title=f"{kind}: {name}", extra=extra
            )
    return written
