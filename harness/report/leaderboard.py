"""Paper-style leaderboards (Markdown, LaTeX, CSV) from the store frame.

Layout follows the SVD-compression papers (style notes C1): ``Ratio | Method | n | perplexities |
zero-shot tasks (each header names its metric, e.g. ``PIQA (acc_norm)``) | Average``, rows grouped
by ratio with the dense model first, a fixed method order inside each group. Each value is the mean
over seeds ± the sample standard deviation, and the best of each group and column is bold, with
every entry the rules cannot separate from the best marked as a tie (dense row excluded):
perplexity and other columns use the seed rule (:mod:`harness.report.spread`), zero-shot columns
the paired rule over documents as well (:mod:`harness.report.paired`). Records evaluated with
lm-eval ``--limit`` are refused unless explicitly allowed, because their numbers are not comparable
with full evaluations; stale records (:mod:`harness.report.staleness`) never count.

One table row is one entry: its perplexity and zero-shot values may come from different record
files (one per evaluation) of the same seeds; each column counts its own seeds.

A table has a short caption (model, ratio definition) and notes beneath it: the spread, bold and
tie rules, and every mark it uses (a single-seed column or value °, a subset protocol ¶, a method
string with options ¹ ², smoke runs † §, compact notation of collapsed perplexities).

:func:`build_leaderboard` is the one table builder: the text formats here and the HTML site
(:mod:`harness.report.site.writer`) render the same :class:`LeaderboardTable`.
"""

from __future__ import annotations

import io
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from tabulate import tabulate

from harness.report.entries import (
    LIMITED_MARK,
    PARTIAL_MARK,
    LimitedRecordsError,
    check_limited,
    entry_identity,
    entry_labels,
    method_footnotes,
    method_sort_key,
    protocol_columns,
    select_model,
    superscript,
)
from harness.report.metrics import MetricSpec, metric_columns, resolve_metric
from harness.report.paired import (
    PAIRED_FALLBACK_NOTE,
    PAIRED_TIE_DEFINITION,
    ColumnDocs,
    entry_docs,
    is_paired_column,
    paired_test,
)
from harness.report.spread import (
    COMPACT_FROM,
    SEED_TIE_RULE,
    SINGLE_SEED_NOTE,
    SPREAD_DEFINITION,
    TIE_DEFINITION,
    TIE_MARK,
    Estimate,
    best_and_ties,
    estimate,
    format_estimate,
    is_tie,
)
from harness.report.staleness import stale_reasons
from harness.report.store import value_text

__all__ = [
    "LimitedRecordsError",
    "LeaderboardTable",
    "RATIO_DEFINITION",
    "RATIO_CAPTION",
    "SINGLE_SEED_MARK",
    "SUBSET_MARK",
    "build_leaderboard",
    "render_leaderboard",
    "latex_escape",
]

logger = logging.getLogger(__name__)

RATIO_DEFINITION = "ratio = fraction of target-linear parameters removed (the attention and MLP projections of every block)"
RATIO_CAPTION = "ratio = fraction of the attention and MLP projection parameters removed (0% = dense model)"
SINGLE_SEED_MARK = "°"  # a value (or, on a header, a whole column) from a single seed where others have more
SUBSET_MARK = "¶"  # a column measured under a subset protocol (``:everyK``, ``:docsN``)
_SUBSET_RE = re.compile(r":(every|docs)(\d+)")


def _fmt_ratio(ratio: float) -> str:
    return f"{ratio * 100:.4g}%"


@dataclass
class LeaderboardTable:
    """One model's leaderboard before rendering.

    Attributes:
        model: Model name.
        metrics: Column specs, in order.
        rows: One row per entry: ``ratio``, ``method``, ``label``, ``is_dense``, ``n_seeds``,
            ``seeds``, ``limited``, ``partial_windows``, ``achieved_ratio``, ``status`` (``ok``,
            or ``failed``/``stale`` when no record of the entry is usable), ``note``, ``members``
            (one dict per record: run_key, source_file, seed, status, stale, copy) and one column per
            metric key holding the mean over seeds (NaN when not measured or not ok).
        spread: Same index as ``rows``, one column per metric key: the sample standard deviation
            over seeds, NaN with fewer than two seeds.
        counts: Same shape: the number of seeds with a value.
        marks: Same shape: ``"best"``, ``"best tie"``, ``"tie"`` or ``""``
            (:func:`harness.report.spread.best_and_ties`, with the paired test on zero-shot columns).
        protocols: Metric key -> the protocol strings behind that column.
        caption: Short caption: model and ratio definition (:data:`RATIO_CAPTION`).
        labels: Metric key -> column label without arrow or marks (a zero-shot task names its
            metric: ``PIQA (acc_norm)``).
        column_marks: Metric key -> marks after the header (:data:`SINGLE_SEED_MARK`,
            :data:`SUBSET_MARK`), ``""`` for none.
        notes: Sentences printed beneath the table: rules, marks, footnotes, protocols.
    """

    model: str
    metrics: list[MetricSpec]
    rows: pd.DataFrame
    spread: pd.DataFrame
    counts: pd.DataFrame
    marks: pd.DataFrame
    protocols: dict[str, list[str]] = field(default_factory=dict)
    caption: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    column_marks: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def bold(self) -> pd.DataFrame:
        """Boolean frame: entries shown bold (the best and its ties)."""
        return self.marks != ""

    def estimate(self, i: int, key: str) -> Estimate:
        """The :class:`Estimate` behind row ``i``, column ``key``."""
        spread = self.spread.at[i, key]
        return Estimate(
            float(self.rows.at[i, key]), None if pd.isna(spread) else float(spread), int(self.counts.at[i, key])
        )

    def header_text(self, spec: MetricSpec) -> str:
        """A column's header in every format: label, direction arrow, column marks (``PIQA (acc_norm)↑¶``)."""
        return self.labels.get(spec.key, spec.label) + spec.arrow + self.column_marks.get(spec.key, "")

    def cell_text(self, i: int, key: str, missing: str = "–") -> str:
        """What every format prints for row ``i``, column ``key`` (without bold or tie markup).

        ``mean ± s`` with two or more seeds, the value alone with one, the row's status
        (``failed``/``stale``) instead of any number when no record of the entry is usable, and
        when this column has fewer seeds than the row: ``°`` for a single seed (unless the whole
        column is single-seed, marked on its header), ``(n=k)`` otherwise.
        """
        status = self.rows.at[i, "status"]
        if status != "ok":
            return str(status)
        spec = next(s for s in self.metrics if s.key == key)
        est = self.estimate(i, key)
        text = format_estimate(spec, est, missing)
        if 0 < est.n < int(self.rows.at[i, "n_seeds"]) and SINGLE_SEED_MARK not in self.column_marks.get(key, ""):
            text += SINGLE_SEED_MARK if est.n == 1 else f" (n={est.n})"
        return text

    def label_text(self, i: int) -> str:
        """The method label with its smoke marks (``†`` --limit, ``§`` first-N windows)."""
        r = self.rows.loc[i]
        return r["label"] + (LIMITED_MARK if r["limited"] else "") + (PARTIAL_MARK if r["partial_windows"] else "")

    def methods_at(self, ratio: float) -> pd.DataFrame:
        """The usable non-dense rows at ``ratio``, one per method string (what rankings and claims compare).

        Raises:
            ValueError: a method with several entries there (configs or calibrations): comparisons
                match entries by method string, so the caller must give one protocol's records.
        """
        rows = self.rows
        at = rows[~rows["is_dense"] & (rows["status"] == "ok") & ((rows["ratio"] - ratio).abs() < 1e-9)]
        dupes = sorted(at.loc[at["method"].duplicated(), "method"].unique())
        if dupes:
            raise ValueError(
                f"{self.model}, ratio {ratio:g}: method(s) {', '.join(dupes)} have several entries (configs or "
                "calibrations); comparisons match entries by method string: keep one of them (filter the frame, "
                "or give only the results folders of one protocol)"
            )
        return at

    def group_keys(self) -> list[str]:
        """Row-group key per row: the dense row is its own group, others group by ratio."""
        return [
            "dense" if d else repr(r) for d, r in zip(self.rows["is_dense"], self.rows["ratio"], strict=True)
        ]


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


def _protocols(model: str, usable: pd.DataFrame, specs: Sequence[MetricSpec]) -> dict[str, list[str]]:
    protocols: dict[str, list[str]] = {}
    for s in specs:
        present = usable[usable[s.key].notna()]
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
    return protocols


def _last_error_line(error: Any) -> str:
    lines = str(error or "").strip().splitlines()
    return lines[-1] if lines else "no error text"


def _adopt_orphans(frame: pd.DataFrame, identity: pd.Series) -> pd.Series:
    """Give failed records written without config or calibration the identity of their method's entry.

    A sweep that fails before the engine starts (model load, a dead worker) records the entry with
    ``config``/``calibration`` None. When the method has exactly one identity among the other
    records, that is the entry the failure belongs to; otherwise it stays a row of its own.
    """
    identity = identity.copy()
    orphan = (frame["status"] == "failed") & frame["method_config"].isin(["{}", "null"]) & (frame["method"] != "dense")
    for idx in frame.index[orphan]:
        others = identity[(frame["method"] == frame.at[idx, "method"]) & ~orphan].unique()
        if len(others) == 1:
            identity[idx] = others[0]
    return identity


Built = tuple[dict[str, Any], dict[str, Estimate], dict[str, ColumnDocs | None]]


def _column_docs(usable: pd.DataFrame, keys: list[str]) -> dict[str, ColumnDocs | None]:
    """Per zero-shot column, the entry's per-document correctness averaged over seeds (paired rule)."""
    paired = [k for k in keys if is_paired_column(k)]
    if not paired:
        return {}
    records = usable.to_dict("records")
    return {k: entry_docs(k, [(r["_seed"], r) for r in records if pd.notna(r[k])]) for k in paired}


def _entry_row(model: str, entry: pd.DataFrame, keys: list[str]) -> Built:
    """Aggregate one entry's records (all seeds) into a table row, its per-metric estimates and the
    per-document data of its zero-shot columns."""
    usable = entry[entry["_usable"]]
    # The same record copied into two result folders (same run key, same numbers) is one record.
    copies = usable.duplicated(subset=["run_key", "_seed", *keys], keep="first")
    if copies.any():
        logger.info("%s %s: %d identical copies of records counted once", model, entry["label"].iloc[0], int(copies.sum()))
        usable = usable[~copies]
    # Re-runs of one seed (e.g. another harness version) are averaged first: they are not extra seeds.
    seeds = sorted(usable["_seed"].unique())
    per_seed = usable.groupby("_seed", sort=True)[keys].mean() if keys else pd.DataFrame(index=seeds)
    # A seed's perplexity and zero-shot records are different evaluations, not re-runs: count per column.
    per_column = usable.groupby("_seed")[keys].count() if keys else pd.DataFrame()
    if (per_column > 1).to_numpy().any():
        logger.warning(
            "%s %s: %d records for %d seed(s); re-runs of one seed are averaged, not counted as seeds",
            model, entry["label"].iloc[0], len(usable), len(per_seed),
        )
    estimates = {k: estimate(per_seed[k].tolist()) for k in keys}
    failed = entry[entry["status"] == "failed"]
    stale = entry[(entry["status"] == "ok") & entry["_stale"].notna()]
    status = "ok" if len(usable) else ("failed" if len(failed) else "stale")
    notes = []
    if len(failed):
        seeds = ", ".join(sorted({value_text(s) for s in failed["_seed"]}))
        notes.append(f"{len(failed)} failed run(s) (seed {seeds}): {_last_error_line(failed['error'].iloc[0])}")
    if len(stale):
        notes.append(f"{len(stale)} stale record(s) left out: {stale['_stale'].iloc[0]}")
    ordered = entry.sort_values(["_seed", "run_key", "source_file"])
    is_copy = ordered.duplicated(subset=["run_key", "_seed", "status", *keys], keep="first")
    members = [
        {
            "run_key": r["run_key"],
            "source_file": r["source_file"],
            "seed": r["_seed"],
            "status": "stale" if r["status"] == "ok" and pd.notna(r["_stale"]) else r["status"],
            "stale": r["_stale"] if pd.notna(r["_stale"]) else None,
            "copy": bool(copy),
        }
        for (_, r), copy in zip(ordered.iterrows(), is_copy, strict=True)
    ]
    first = entry.iloc[0]
    row = {
        "ratio": first["_ratio"],
        "method": first["method"],
        "label": first["label"],
        "is_dense": first["method"] == "dense",
        "n_seeds": len(per_seed),
        "seeds": list(per_seed.index),
        "limited": bool(entry["limited"].any()),
        "partial_windows": bool(entry["partial_windows"].any()),
        "achieved_ratio": pd.to_numeric(usable["achieved_ratio"], errors="coerce").mean() if len(usable) else math.nan,
        "status": status,
        "note": "; ".join(notes),
        "members": members,
    }
    return row, estimates, _column_docs(usable, keys)


def _build_one(
    model: str, frame: pd.DataFrame, metrics: Sequence[str] | None, include_unusable: bool
) -> LeaderboardTable:
    frame = frame.copy()
    frame["status"] = frame["status"].fillna("ok")
    frame["_stale"] = stale_reasons(frame)
    frame["_usable"] = (frame["status"] == "ok") & frame["_stale"].isna()
    for col in ("limited", "partial_windows"):
        frame[col] = frame[col].fillna(False).astype(bool) if col in frame else False
    stale = frame[(frame["status"] == "ok") & ~frame["_usable"]]
    for _, r in stale.iterrows():
        # Shown as "stale" where unusable entries are kept; otherwise the reader must hear why a row is gone.
        logger.log(
            logging.INFO if include_unusable else logging.WARNING,
            "stale record %s (%s, ratio %s): %s", r["source_file"] or r["run_key"], r["method"], r["ratio"], r["_stale"],
        )
    if not include_unusable:
        frame = frame[frame["_usable"]]
    usable = frame[frame["_usable"]]
    if frame.empty:
        raise ValueError(f"{model}: no usable records (all failed or stale)")
    if usable.empty:  # only failed/stale entries to show: no column has a value
        specs = [resolve_metric(m, frame.columns) for m in metrics or []]
    else:
        specs = _resolve_metrics(usable, metrics)
    keys = [s.key for s in specs]
    for k in keys:
        # Coerce: a column that is None in every record arrives as object dtype and cannot be averaged.
        frame[k] = pd.to_numeric(frame[k], errors="coerce") if k in frame.columns else math.nan
    protocols = _protocols(model, frame[frame["_usable"]], specs)
    frame["_identity"] = _adopt_orphans(frame, entry_identity(frame))
    frame["_ratio"] = frame["ratio"].round(6)
    frame["_seed"] = frame["seed"].map(value_text)
    frame["label"] = entry_labels(frame)
    built = [_entry_row(model, entry, keys) for _, entry in frame.groupby(["_ratio", "_identity"], sort=False)]
    # Dense first, then ratio groups ascending, then the fixed method order.
    built.sort(
        key=lambda b: (
            0 if b[0]["is_dense"] else 1, b[0]["ratio"], method_sort_key(b[0]["method"]), b[0]["label"]
        )
    )
    rows = pd.DataFrame([{**r, **{k: e.mean for k, e in est.items()}} for r, est, _ in built])
    spread = pd.DataFrame(
        [{k: (math.nan if e.spread is None else e.spread) for k, e in est.items()} for _, est, _ in built],
        index=rows.index, columns=keys, dtype=float,
    )
    counts = pd.DataFrame([{k: e.n for k, e in est.items()} for _, est, _ in built], index=rows.index, columns=keys)
    marks = pd.DataFrame("", index=rows.index, columns=keys)
    contenders = rows[~rows["is_dense"] & (rows["status"] == "ok")]
    # Zero-shot column -> whether its compared entries had per-document data: all, some or none.
    docs_seen: dict[str, set[bool]] = {}
    for _ratio, g in contenders.groupby("ratio", sort=False):
        for s in specs:
            estimates = {i: built[i][1][s.key] for i in g.index}
            test = None
            if is_paired_column(s.key):
                docs = {i: built[i][2].get(s.key) for i in g.index}
                test = paired_test(docs)
                compared = [i for i, e in estimates.items() if e.has_value]
                if len(compared) > 1:
                    docs_seen.setdefault(s.key, set()).update(docs[i] is not None for i in compared)
            for i, mark in best_and_ties(s, estimates, test).items():
                marks.at[i, s.key] = mark
    table = LeaderboardTable(
        model=model, metrics=specs, rows=rows, spread=spread, counts=counts, marks=marks, protocols=protocols,
        labels={s.key: _column_label(s, usable) for s in specs},
    )
    table.column_marks = _column_marks(table)
    table.caption = f"{model}: {RATIO_CAPTION}."
    states = {k: "paired" if seen == {True} else "partial" if True in seen else "seed" for k, seen in docs_seen.items()}
    table.notes = _notes(table, states)
    return table


def _column_label(spec: MetricSpec, usable: pd.DataFrame) -> str:
    """The header label; a zero-shot task's value names the metric it reports (``PIQA (acc_norm)``)."""
    if spec.key.startswith("zeroshot.tasks.") and spec.key.endswith(".value"):
        col = spec.key.removesuffix(".value") + ".metric"
        present = usable[usable[spec.key].notna()] if spec.key in usable else usable.iloc[:0]
        metrics = sorted({str(v) for v in present[col].dropna()}) if col in present else []
        if len(metrics) == 1:  # several are refused by _protocols (acc and acc_norm differ by points)
            return f"{spec.label} ({metrics[0]})"
    return spec.label


def _contenders(table: LeaderboardTable) -> pd.Index:
    """Rows the rules compare: usable, not the dense reference."""
    return table.rows.index[(table.rows["status"] == "ok") & ~table.rows["is_dense"]]


def _column_marks(table: LeaderboardTable) -> dict[str, str]:
    """Header marks: ``°`` when every value of a column is a single seed while another column of the
    table has a spread; ``¶`` when the column's protocol scores a subset (``:everyK``, ``:docsN``)."""
    rows = _contenders(table)
    counts = table.counts.loc[rows]
    spread_elsewhere = bool((counts > 1).to_numpy().any())
    out = {}
    for s in table.metrics:
        n = counts[s.key][counts[s.key] > 0]
        single = spread_elsewhere and len(n) > 0 and bool((n == 1).all())
        subset = any(_SUBSET_RE.search(p) for p in table.protocols.get(s.key, []))
        out[s.key] = (SINGLE_SEED_MARK if single else "") + (SUBSET_MARK if subset else "")
    return out


def _subset_text(protocol: str) -> str:
    """What a subset protocol scores, in words (``:every4`` -> documents 0, 4, 8, … of each task)."""
    rule, k = _SUBSET_RE.search(protocol).groups()  # type: ignore[union-attr]
    items = "documents" if protocol.startswith("zeroshot") else "windows"
    if rule == "docs":
        return f"{k} documents per task, evenly spread over it"
    return f"{items} 0, {k}, {2 * int(k)}, …" + (" of each task" if items == "documents" else "")


def _compact_cells(table: LeaderboardTable) -> bool:
    ok = table.rows["status"] == "ok"
    return any(
        s.kind == "ppl" and bool((table.rows.loc[ok, s.key].abs() >= COMPACT_FROM).any()) for s in table.metrics
    )


def _notes(table: LeaderboardTable, paired_state: Mapping[str, str]) -> list[str]:
    """The sentences beneath the table: every rule it applies and every mark it shows, nothing else.

    ``paired_state``: zero-shot column -> ``"paired"`` (every compared entry had per-document data),
    ``"partial"`` (some had) or ``"seed"`` (none had: the seed rule alone decided).
    """
    return _rule_notes(table, paired_state) + _mark_notes(table) + _provenance_notes(table)


def _rule_notes(table: LeaderboardTable, paired_state: Mapping[str, str]) -> list[str]:
    """Values, bold, and the tie rule of each kind of column (seed rule; paired rule; fallbacks)."""
    # The dense model has no calibration, so it has no seeds to spread over: only methods count here.
    rows = table.rows.loc[_contenders(table)]
    spread = bool((rows["n_seeds"] > 1).any())
    notes = []
    if spread:
        notes.append(f"Values: {SPREAD_DEFINITION}.")
    if (rows["n_seeds"] == 1).any():
        notes.append(f"{SINGLE_SEED_NOTE}.")
    notes.append("Bold: best per ratio group and column (dense row excluded); ↓ lower is better, ↑ higher is better.")
    paired = [k for k, state in paired_state.items() if state != "seed"]
    seed_only = [s.key for s in table.metrics if s.key not in paired]
    if seed_only and (spread or table.marks[seed_only].map(is_tie).to_numpy().any()):
        which = ", ".join(table.labels.get(k, k) for k in seed_only)
        notes.append(f"{TIE_DEFINITION}." if not paired else f"{TIE_MARK} tie ({which}): {SEED_TIE_RULE}.")
    if paired:
        notes.append(f"{TIE_MARK} tie, {PAIRED_TIE_DEFINITION}.")
    fallback = [k for k, state in paired_state.items() if state != "paired"]
    if fallback:
        which = "Zero-shot columns" if not paired else ", ".join(table.labels.get(k, k) for k in fallback)
        notes.append(f"{which}: {PAIRED_FALLBACK_NOTE}.")
    if any(s.kind == "acc" for s in table.metrics):
        notes.append("Zero-shot accuracies in %.")
    return notes


def _mark_notes(table: LeaderboardTable) -> list[str]:
    """One note per mark the table shows: compact notation, °, (n=k), ¶ and the method footnotes."""
    notes = []
    if _compact_cells(table):
        notes.append(
            f"Perplexities ≥ {COMPACT_FROM:,.0f} (collapsed models) in compact notation, two significant digits: "
            f"6.8e7 = 6.8 × 10{superscript(7)}."
        )
    cells = [table.cell_text(i, s.key) for i in _contenders(table) for s in table.metrics]
    if SINGLE_SEED_MARK in "".join(table.column_marks.values()) or any(c.endswith(SINGLE_SEED_MARK) for c in cells):
        notes.append(
            f"{SINGLE_SEED_MARK} a single seed where the row has more (after a header: every value of the "
            "column): no spread, s = 0 in the seed rule."
        )
    if any("(n=" in c for c in cells):
        notes.append("(n=k): the value comes from k of the row's n seeds.")
    subsets = sorted({p for s in table.metrics for p in table.protocols.get(s.key, []) if _SUBSET_RE.search(p)})
    notes += [
        f"{SUBSET_MARK} subset protocol {p}: {_subset_text(p)} only, the same for every method; "
        "not comparable with the full protocol."
        for p in subsets
    ]
    notes += [f"{superscript(n)} {method}" for method, n in method_footnotes(table.rows["method"]).items()]
    return notes


def _provenance_notes(table: LeaderboardTable) -> list[str]:
    """Protocols, smoke marks († §) and unusable rows."""
    notes = []
    protos = sorted({p for ps in table.protocols.values() for p in ps})
    if protos:
        notes.append(f"Protocols: {', '.join(protos)}.")
    if table.rows["limited"].astype(bool).any():
        notes.append(f"{LIMITED_MARK} evaluated with --limit (smoke run, not comparable).")
    if table.rows["partial_windows"].astype(bool).any():
        notes.append(f"{PARTIAL_MARK} perplexity over the first N windows only (--eval-max-windows smoke run).")
    if (table.rows["status"] != "ok").any():
        notes.append("failed / stale: no usable record for the entry; no number is shown.")
    return notes


def build_leaderboard(
    frame: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    allow_limited: bool = False,
    model: str | None = None,
    include_unusable: bool = False,
) -> list[LeaderboardTable]:
    """Aggregate the store frame into one :class:`LeaderboardTable` per model.

    Args:
        frame: Store frame from :func:`harness.report.store.load_store`.
        metrics: Metric names/aliases for the columns; default: every registered metric with values.
        allow_limited: Include ``--limit`` smoke-run records (marked with †) instead of refusing.
        model: Restrict to one model (name or id); default: one table per model.
        include_unusable: Keep entries whose records are all failed or stale, as rows with that
            status and no numbers (the HTML site); by default they are left out (stale ones with a
            warning each; failed ones are already dropped, with a warning, by the store loader).

    Returns:
        The tables, sorted by model name.

    Raises:
        LimitedRecordsError: If limited records would be included and ``allow_limited`` is False.
        ValueError: Unknown model, empty store, or a column mixing evaluation protocols.
        UnknownMetricError: Unknown metric name (with close matches).
    """
    if "status" in frame and not include_unusable:
        frame = frame[frame["status"].fillna("ok") == "ok"]
    tables = []
    for name, sub in select_model(frame, model):
        check_limited(sub, allow_limited)
        tables.append(_build_one(name, sub, metrics, include_unusable))
    return tables


def _text_rows(table: LeaderboardTable, bold: tuple[str, str], missing: str) -> list[list[str]]:
    out = []
    keys = table.group_keys()
    for i, r in table.rows.iterrows():
        ratio = "0%" if r["is_dense"] else _fmt_ratio(r["ratio"])
        first = i == 0 or keys[i] != keys[i - 1]
        row = [ratio if first else "", table.label_text(i), str(r["n_seeds"]) if r["status"] == "ok" else "–"]
        for s in table.metrics:
            text = table.cell_text(i, s.key, missing)
            mark = table.marks.at[i, s.key]
            if mark:
                text = f"{bold[0]}{text}{bold[1]}" + (TIE_MARK if is_tie(mark) else "")
            row.append(text)
        out.append(row)
    return out


def _render_md(table: LeaderboardTable) -> str:
    headers = ["Ratio", "Method", "n"] + [table.header_text(s) for s in table.metrics]
    body = tabulate(
        _text_rows(table, ("**", "**"), "–"),
        headers=headers,
        tablefmt="pipe",
        disable_numparse=True,
        colalign=("left", "left", "right") + ("right",) * len(table.metrics),
    )
    model, _, rest = table.caption.partition(": ")
    notes = "".join(f"- {n}\n" for n in table.notes)
    return f"**{model}**: {rest}\n\n{body}\n\n{notes}"


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
    "‡": r"$^\ddagger$",
    "§": r"$^\S$",
    "±": r"$\pm$",
    "−": r"$-$",
    "|": r"$|$",
    "<": r"$<$",
    ">": r"$>$",
    "≤": r"$\leq$",
    "≈": r"$\approx$",
    "×": r"$\times$",
    "–": "--",
    "∞": r"$\infty$",
    "≥": r"$\geq$",
    "°": r"$^{\circ}$",
    "¶": r"$^{\P}$",
    "√": r"$\surd$",
    "Σ": r"$\Sigma$",
    "·": r"$\cdot$",
    "…": r"\ldots{}",
    **{sup: f"$^{{{digit}}}$" for digit, sup in zip("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹", strict=True)},
}


def latex_escape(text: str) -> str:
    """Escape LaTeX special characters and map the few Unicode symbols we emit to macros."""
    return "".join(_LATEX_ESCAPES.get(ch, ch) for ch in text)


def _column_group(spec: MetricSpec) -> str | None:
    """The spanning header above a column in LaTeX (papers group perplexities and accuracies)."""
    if spec.kind == "ppl":
        return "Perplexity"
    return "Zero-shot accuracy (%)" if spec.key.startswith("zeroshot.") else None


def _latex_group_header(table: LeaderboardTable) -> list[str]:
    """``\\multicolumn`` spans with ``\\cmidrule`` under them, when the columns form two or more
    contiguous groups (perplexity, zero-shot accuracy); nothing otherwise."""
    runs: list[tuple[str | None, int]] = []
    for s in table.metrics:
        group = _column_group(s)
        if runs and runs[-1][0] == group:
            runs[-1] = (group, runs[-1][1] + 1)
        else:
            runs.append((group, 1))
    named = [g for g, _ in runs if g is not None]
    if len(named) < 2 or len(set(named)) != len(named):
        return []
    cells, rules, col = ["", "", ""], [], 4
    for group, width in runs:
        if group is None:
            cells += [""] * width
        else:
            cells.append(f"\\multicolumn{{{width}}}{{c}}{{{latex_escape(group)}}}")
            rules.append(f"\\cmidrule(lr){{{col}-{col + width - 1}}}")
        col += width
    return [" & ".join(cells) + " \\\\", "".join(rules)]


def _render_latex(table: LeaderboardTable) -> str:
    n = len(table.metrics)
    slug = re.sub(r"[^a-z0-9]+", "-", table.model.lower()).strip("-")
    header = " & ".join(["Ratio", "Method", "$n$"] + [latex_escape(table.header_text(s)) for s in table.metrics])
    lines = [
        "% svdbench leaderboard; needs \\usepackage{booktabs} and \\usepackage{multirow}",
        "\\begin{table}[t]",
        "\\centering",
        f"\\caption{{{latex_escape(table.caption)}}}",
        f"\\label{{tab:svdbench-{slug}}}",
        f"\\begin{{tabular}}{{llr{'r' * n}}}",
        "\\toprule",
        *_latex_group_header(table),
        header + " \\\\",
    ]
    text_rows = _text_rows(table, ("\x00B", "\x00E"), "–")
    keys = table.group_keys()
    for i, row in enumerate(text_rows):
        if row[0]:
            lines.append("\\midrule")
            span = keys.count(keys[i])
            ratio_cell = latex_escape(row[0])
            row[0] = f"\\multirow{{{span}}}{{*}}{{{ratio_cell}}}" if span > 1 else ratio_cell
        escaped = [latex_escape(c).replace("\x00B", "\\textbf{").replace("\x00E", "}") for c in row[1:]]
        lines.append(" & ".join([row[0], *escaped]) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if table.notes:
        # Notes beneath the table, small, one per line: the caption stays a caption.
        lines += ["\\par\\smallskip", "\\begin{minipage}{\\linewidth}\\footnotesize\\raggedright"]
        lines += [latex_escape(note) + "\\par" for note in table.notes]
        lines.append("\\end{minipage}")
    lines.append("\\end{table}")
    return "\n".join(lines) + "\n"


def _render_csv(tables: list[LeaderboardTable]) -> str:
    """Raw numbers: per metric the mean, ``.std`` (sample s.d.; empty with one seed), ``.n`` and ``.mark``."""
    frames = []
    for t in tables:
        f = t.rows[["ratio", "method", "label", "n_seeds", "limited", "partial_windows", "status", "achieved_ratio"]].copy()
        f["seeds"] = t.rows["seeds"].map(lambda s: " ".join(map(str, s)))
        for s in t.metrics:
            f[s.key] = t.rows[s.key]
            f[f"{s.key}.std"] = t.spread[s.key]
            f[f"{s.key}.n"] = t.counts[s.key]
            f[f"{s.key}.mark"] = t.marks[s.key]
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
        fmt: ``"md"`` (a bold caption line, the pipe table, its notes as a list), ``"latex"``
            (booktabs without vertical rules, multirow ratio groups, spanning perplexity / accuracy
            headers, ``\\textbf`` for best, the notes in a footnote-size block under the tabular) or
            ``"csv"`` (raw numbers, one header, a ``model`` column).
            The HTML site is a directory, not text: :func:`harness.report.site.writer.write_site`.
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
    if fmt == "html":
        raise ValueError("the html leaderboard is a site, not text: use write_site() (CLI: --format html --out DIR)")
    if fmt not in ("md", "latex", "csv"):
        raise ValueError(f"unknown leaderboard format {fmt!r}; choose md, latex, csv or html")
    tables = build_leaderboard(frame, metrics=metrics, allow_limited=allow_limited, model=model)
    if fmt == "csv":
        return _render_csv(tables)
    render = _render_md if fmt == "md" else _render_latex
    return "\n".join(render(t) for t in tables)
