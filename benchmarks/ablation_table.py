"""Markdown ablation table from a directory of result records.

    python -m benchmarks.ablation_table results/ablations/tiny-llama-long [--metric wikitext2.ppl] \
        [--methods svd-llm,svd-llm+adacomp,svd-llm+adacr,adasvd] [--out FILE]

One row per (ratio, method), the dense row first and methods in ``--methods`` order (default: all,
by name). Records that differ only in the seed are replicates: each row shows n (the seeds) and,
per column, the mean over seeds ± the sample standard deviation (one seed: the value alone, no
spread), the rule every svdbench report uses (:mod:`harness.report.spread`). Columns: perplexity
(or another dotted metric), achieved ratio, the summed and mean per-layer calibration output error
``||(W - W')X||_F / ||W X||_F`` (and the error against the dense outputs on compressed-model inputs
where the method collected it), and wall times (means). Stale records
(:mod:`harness.report.staleness`) are left out with a warning.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness.report.entries import entry_identity
from harness.report.spread import SINGLE_SEED_NOTE, SPREAD_DEFINITION, Estimate, estimate
from harness.report.staleness import stale_reasons
from harness.report.store import read_records, records_to_frame, value_text
from methods.method import split_method_list

log = logging.getLogger("benchmarks.ablation_table")


def metric_value(record: dict[str, Any], dotted: str) -> Any:
    value: Any = record.get("metrics", {})
    for part in dotted.split("."):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def load_records(directory: Path) -> list[dict[str, Any]]:
    """The ok records under ``directory`` (the report store's reader: it skips non-record JSON such
    as diagnostics dumps and hidden temporaries, and names any malformed record)."""
    return [rec for rec in read_records(directory) if rec["status"] == "ok"]


def select(records: list[dict[str, Any]], methods: list[str] | None) -> list[dict[str, Any]]:
    """The dense record(s) and those of ``methods`` (all when None), by ratio then in ``methods`` order."""
    if methods is None:
        order = {name: i for i, name in enumerate(sorted({r["method"]["name"] for r in records}))}
    else:
        order = {name: i for i, name in enumerate(methods)}
    chosen = [r for r in records if r["method"]["name"] == "dense" or r["method"]["name"] in order]
    return sorted(chosen, key=lambda r: (r["ratio"], r["method"]["name"] != "dense", order.get(r["method"]["name"], -1),
                                         (r.get("calibration") or {}).get("seed") or 0))


def _layer_errors(layers: Any, field: str) -> tuple[float | None, float | None]:
    errs = [layer[field] for layer in layers or [] if layer.get(field) is not None]
    return (math.fsum(errs), math.fsum(errs) / len(errs)) if errs else (None, None)


def _fmt(est: Estimate, digits: int) -> str:
    """``mean ± s`` with two or more seeds, the mean alone with one, an em dash with none."""
    if est.n == 0:
        return "—"
    text = f"{est.mean:,.{digits}f}"
    return text if est.spread is None else f"{text} ± {est.spread:,.{digits}f}"


def _per_record(frame: pd.DataFrame, records: list[dict[str, Any]], metric: str) -> pd.DataFrame:
    """One value per record and column (the quantities the table summarises over seeds)."""
    out = frame[["method", "ratio", "seed"]].copy()
    out["metric"] = [metric_value(r, metric) for r in records]
    out["achieved"] = pd.to_numeric(frame["achieved_ratio"], errors="coerce")
    for field, name in (("calib_rel_error", "err"), ("calib_rel_error_compressed", "err_c")):
        pairs = [_layer_errors(layers, field) for layers in frame["layers"]]
        out[f"sum_{name}"] = [p[0] for p in pairs]
        out[f"mean_{name}"] = [p[1] for p in pairs]
    for stage in ("compress", "eval"):
        col = f"time_{stage}_s"
        out[stage] = pd.to_numeric(frame[col], errors="coerce") if col in frame else math.nan
    out["seed"] = out["seed"].map(value_text)
    return out.astype({c: float for c in ("metric", "sum_err", "mean_err", "sum_err_c", "mean_err_c")})


def ablation_rows(records: list[dict[str, Any]], metric: str, digits: int = 2) -> list[list[str]]:
    """Table rows in the order of ``records`` (first appearance of each cell), seeds aggregated."""
    if not records:
        return []
    frame = records_to_frame(records)
    reasons = stale_reasons(frame)
    for i in reasons.index[reasons.notna()]:
        log.warning("leaving out stale record %s: %s", frame.at[i, "source_file"] or frame.at[i, "run_key"], reasons[i])
    keep = reasons.isna().to_numpy()
    frame = frame[keep].reset_index(drop=True)
    records = [r for r, k in zip(records, keep, strict=True) if k]
    if frame.empty:
        return []
    values = _per_record(frame, records, metric)
    identity = entry_identity(frame)
    values["_cell"] = frame["ratio"].round(6).astype(str) + "|" + identity
    # Ablation tables name methods by their method strings; a config hash only where one string has several.
    several = identity.groupby(frame["method"]).transform("nunique") > 1
    values["_label"] = [f"{m} (cfg {h})" if s else m for m, h, s in zip(frame["method"], frame["config_hash"], several, strict=True)]
    columns: list[tuple[str, Callable[[Estimate], str]]] = [
        ("achieved", lambda e: _fmt(Estimate(e.mean, None, e.n), 4)),  # set by the ratio: no spread worth showing
        ("metric", lambda e: _fmt(e, digits)),
        ("sum_err", lambda e: _fmt(e, 3)),
        ("mean_err", lambda e: _fmt(e, 4)),
        ("mean_err_c", lambda e: _fmt(e, 4)),
        ("compress", lambda e: _fmt(Estimate(e.mean, None, e.n), 1)),
        ("eval", lambda e: _fmt(Estimate(e.mean, None, e.n), 1)),
    ]
    rows = []
    for _, cell in values.groupby("_cell", sort=False):
        # Re-runs of one seed are averaged first, so they never pass for extra seeds.
        per_seed = cell.groupby("seed", sort=True)[[c for c, _ in columns]].mean()
        seeds = [s for s in per_seed.index if s != ""]
        first = cell.iloc[0]
        rows.append([
            f"{first['ratio']:.2f}", first["_label"],
            # The dense model has no calibration, hence no seeds to list.
            str(len(per_seed)), ", ".join(seeds) if first["method"] != "dense" and seeds else "—",
            *(fmt(estimate(per_seed[col].tolist())) for col, fmt in columns),
        ])
    return rows


def render(records: list[dict[str, Any]], metric: str = "wikitext2.ppl", digits: int = 2) -> str:
    header = ["ratio", "method", "n", "seeds", "achieved", metric, "sum calib err", "mean calib err",
              "mean err (compressed inputs)", "compress s", "eval s"]
    rows = ablation_rows(records, metric, digits)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = []
    if any(int(r[2]) > 1 for r in rows):
        notes.append(f"Values: {SPREAD_DEFINITION}; times are means.")
    if any(int(r[2]) == 1 and r[1] != "dense" for r in rows):
        notes.append(f"{SINGLE_SEED_NOTE}.")
    return "\n".join(lines) + "\n" + ("\n" + " ".join(notes) + "\n" if notes else "")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--metric", default="wikitext2.ppl")
    parser.add_argument("--methods", help="comma-separated method names, in table order (default: all)")
    parser.add_argument("--digits", type=int, default=2, help="decimals of the metric (e.g. 4 for cosines)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    methods = list(split_method_list(args.methods)) if args.methods else None
    text = render(select(load_records(args.directory), methods), args.metric, args.digits)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text, end="")  # the table is the command's output (stdout), not a log message
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
