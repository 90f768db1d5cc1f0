"""Regression verdicts: compare a results store against a baseline store, and check scenario YAMLs.

Cells are matched on everything that defines them (model, method name + config, ratio,
calibration, seed, ``--limit``) and each metric additionally on its evaluation protocol, so a
protocol change shows up as a *missing* baseline cell rather than as a silent "regression". A
metric is *worse* when it moved against its direction (perplexity up, accuracy/cosine down) by
more than ``rtol`` relative to the baseline. Missing baseline cells and worse metrics fail
(:attr:`CompareResult.exit_code` 1); better metrics and cells new in the results do not. A record of
either store that fails verification (:mod:`harness.integrity`) is never compared: it is a
``tampered`` row naming its file and the failed check, and it fails the comparison too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from tabulate import tabulate

from harness.report.entries import protocol_columns
from harness.report.metrics import metric_columns, relative_change, resolve_metric, verdict
from harness.report.scenario import check_scenario
from harness.report.store import as_frame, load_store, value_text

__all__ = ["KEY_COLUMNS", "CompareResult", "compare", "check_scenario", "relative_change", "verdict"]

logger = logging.getLogger(__name__)

#: Frame columns that identify a cell (the metric protocol is added per metric).
KEY_COLUMNS: tuple[str, ...] = tuple(
    "model method method_config ratio calib_source calib_samples calib_seqlen calib_seed seed limit".split()
)
_SHOWN = (
    "model method config ratio calibration seed limit metric protocol baseline current rel_change verdict note"
).split()


@dataclass
class CompareResult:
    """Outcome of :func:`compare`.

    Attributes:
        table: One row per (baseline cell, metric) plus one row per cell only in the results;
            columns ``model, method, config, ratio, calibration, seed, limit, metric, protocol,
            baseline, current, rel_change, verdict, note``.
        rtol: The tolerance used (a float, or metric key -> float with ``"default"``).
    """

    table: pd.DataFrame
    rtol: float | Mapping[str, float] = 0.02
    counts: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.counts = self.table["verdict"].value_counts().to_dict() if not self.table.empty else {}

    @property
    def n_worse(self) -> int:
        return int(self.counts.get("worse", 0))

    @property
    def n_missing(self) -> int:
        return int(self.counts.get("missing", 0))

    @property
    def n_tampered(self) -> int:
        return int(self.counts.get("tampered", 0))

    @property
    def exit_code(self) -> int:
        """1 when any metric is worse, any baseline cell/metric is missing or any record is tampered, else 0."""
        return 1 if self.n_worse or self.n_missing or self.n_tampered else 0

    def summary(self) -> str:
        """One line: verdict counts and PASS/FAIL."""
        shown = ("ok", "better", "worse", "missing", "new") + (("tampered",) if self.n_tampered else ())
        parts = ", ".join(f"{self.counts.get(v, 0)} {v}" for v in shown)
        return f"{'FAIL' if self.exit_code else 'PASS'}: {parts} (rtol {self.rtol})"

    def problems(self) -> pd.DataFrame:
        """Rows whose verdict is not ``ok``."""
        return self.table[self.table["verdict"] != "ok"]

    def to_markdown(self, only_problems: bool = True) -> str:
        """The difference table as Markdown (by default only non-ok rows), followed by the summary."""
        t = self.problems() if only_problems else self.table
        if t.empty:
            return self.summary() + "\n"
        shown = t.copy()
        shown["rel_change"] = shown["rel_change"].map(lambda v: "" if pd.isna(v) else f"{v:+.2%}")
        for col in ("baseline", "current"):
            shown[col] = shown[col].map(lambda v: "" if pd.isna(v) else f"{v:.6g}")
        body = tabulate(
            shown.to_numpy().tolist(), headers=list(shown.columns), tablefmt="pipe", disable_numparse=True
        )
        return f"{body}\n\n{self.summary()}\n"


def _rtol_for(rtol: float | Mapping[str, float], key: str) -> float:
    if isinstance(rtol, Mapping):
        return float(rtol.get(key, rtol.get("default", 0.02)))
    return float(rtol)


def _key(row: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(value_text(round(row[c], 6) if c == "ratio" else row.get(c)) for c in KEY_COLUMNS)


def _protocol(row: Mapping[str, Any], key: str) -> str:
    return "/".join(value_text(row.get(c)) for c in protocol_columns(key) if value_text(row.get(c)))


def _describe(row: Mapping[str, Any]) -> dict[str, Any]:
    calib = (
        ""
        if not value_text(row.get("calib_source"))
        else (
            f"{value_text(row.get('calib_source')).rsplit('/', 1)[-1]} "
            f"{value_text(row.get('calib_samples'))}x{value_text(row.get('calib_seqlen'))} s{value_text(row.get('calib_seed'))}"
        )
    )
    return {
        "model": row.get("model"),
        "method": row.get("method"),
        "config": row.get("config_hash"),
        "ratio": row.get("ratio"),
        "calibration": calib,
        "seed": value_text(row.get("seed")),
        "limit": value_text(row.get("limit")),
    }


def _index(frame: pd.DataFrame, keys: Sequence[str]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    cells: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in frame.to_dict("records"):
        cells.setdefault(_key(row), []).append(row)
    for k, rows in cells.items():
        if len(rows) > 1:
            logger.warning("%d records share one cell %s; averaging them", len(rows), k[:4])
    return cells


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    vals = [float(r[key]) for r in rows if r.get(key) is not None and not pd.isna(r.get(key))]
    return sum(vals) / len(vals) if vals else math.nan


def _load(source: pd.DataFrame | str | Path, include_failed: bool) -> pd.DataFrame:
    if isinstance(source, (str, Path)):
        return load_store(source, include_failed=include_failed, include_rejected=True)
    return as_frame(source)


def _tampered_row(row: Mapping[str, Any], store: str) -> dict[str, Any]:
    return {**_describe(row), "metric": "", "protocol": "", "baseline": math.nan, "current": math.nan,
            "rel_change": math.nan, "verdict": "tampered",
            "note": f"{store} record {row.get('source_file') or row.get('run_key')} is tampered: {row.get('error')}"}


def compare(
    results: pd.DataFrame | str | Path,
    baseline: pd.DataFrame | str | Path,
    rtol: float | Mapping[str, float] = 0.02,
    metrics: Sequence[str] | None = None,
) -> CompareResult:
    """Compare a results store with a baseline store, cell by cell and metric by metric.

    Args:
        results: Store frame or directory of the run under test.
        baseline: Store frame or directory of the reference run.
        rtol: Relative tolerance; a float, or metric key/alias -> float (``"default"`` for others).
        metrics: Metric names/aliases to compare; default: every directional metric in the baseline.

    Returns:
        The :class:`CompareResult` (see its ``exit_code``).
    """
    cur = _load(results, include_failed=True)
    base = _load(baseline, include_failed=False)
    tampered = [_tampered_row(r, "results") for r in cur[cur["status"] == "tampered"].to_dict("records")]
    tampered += [_tampered_row(r, "baseline") for r in base[base["status"] == "tampered"].to_dict("records")]
    base = base[base["status"] != "tampered"]
    if isinstance(rtol, Mapping):
        rtol = {(k if k == "default" else resolve_metric(k, base.columns).key): v for k, v in rtol.items()}
    if metrics:
        keys = [resolve_metric(m, base.columns).key for m in metrics]
    else:
        keys = [k for k in metric_columns(base.columns) if base[k].notna().any()]
    keys += [c for c in base.columns if c.endswith(".nonfinite_windows") and not metrics]
    base_cells, cur_cells = _index(base, KEY_COLUMNS), _index(cur, KEY_COLUMNS)
    rows: list[dict[str, Any]] = []
    for cell, brows in base_cells.items():
        crows = [r for r in cur_cells.get(cell, []) if r.get("status", "ok") == "ok"]
        failed = [r for r in cur_cells.get(cell, []) if r.get("status") == "failed"]
        bad = [r for r in cur_cells.get(cell, []) if r.get("status") == "tampered"]
        for key in keys:
            spec = resolve_metric(key, base.columns)
            bval = _mean(brows, key)
            if math.isnan(bval):
                continue  # the baseline does not measure this metric for this cell
            proto = _protocol(brows[0], key)
            matching = [r for r in crows if _protocol(r, key) == proto]
            out = {**_describe(brows[0]), "metric": key, "protocol": proto, "baseline": bval}
            if not matching:
                if failed:
                    err = str(failed[0].get("error") or "").strip().splitlines()[-1:] or ["failed"]
                    note = f"run failed: {err[0]}"
                elif bad and not crows:
                    note = f"only a tampered record: {bad[0].get('source_file') or bad[0].get('run_key')}"
                elif crows:
                    note = f"protocol differs (results: {_protocol(crows[0], key) or 'none'})"
                else:
                    note = "cell not in results"
                rows.append(
                    {**out, "current": math.nan, "rel_change": math.nan, "verdict": "missing", "note": note}
                )
                continue
            cval = _mean(matching, key)
            tol = _rtol_for(rtol, key)
            v = verdict(spec, bval, cval, tol)
            note = "metric not reported" if v == "missing" else ""
            rel = math.nan if v == "missing" else relative_change(bval, cval)
            rows.append({**out, "current": cval, "rel_change": rel, "verdict": v, "note": note})
    for cell, crows in cur_cells.items():
        if cell not in base_cells and any(r.get("status", "ok") == "ok" for r in crows):
            rows.append(
                {
                    **_describe(crows[0]),
                    "metric": "",
                    "protocol": "",
                    "baseline": math.nan,
                    "current": math.nan,
                    "rel_change": math.nan,
                    "verdict": "new",
                    "note": "not in baseline",
                }
            )
    for row in tampered:
        logger.error("compare: %s", row["note"])
    table = pd.DataFrame(rows + tampered, columns=_SHOWN)
    result = CompareResult(table=table, rtol=rtol)
    logger.info("compare: %s", result.summary())
    return result
