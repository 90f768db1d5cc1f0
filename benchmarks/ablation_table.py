"""Markdown ablation table from a directory of result records.

    python -m benchmarks.ablation_table results/ablations/tiny-llama-long [--metric wikitext2.ppl] \
        [--methods svd-llm,svd-llm+adacomp,svd-llm+adacr,adasvd] [--out FILE]

One row per (ratio, method), the dense row first and methods in ``--methods`` order (default: all, by name): perplexity (or another dotted metric), achieved ratio, the summed and
mean per-layer calibration output error ``||(W - W')X||_F / ||W X||_F`` (and the error against the
dense outputs on compressed-model inputs where the method collected it), and wall times.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from harness.report.store import read_records


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


def _fmt(x: Any, digits: int = 2) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return str(x)


def select(records: list[dict[str, Any]], methods: list[str] | None) -> list[dict[str, Any]]:
    """The dense record(s) and those of ``methods`` (all when None), by ratio then in ``methods`` order."""
    if methods is None:
        order = {name: i for i, name in enumerate(sorted({r["method"]["name"] for r in records}))}
    else:
        order = {name: i for i, name in enumerate(methods)}
    chosen = [r for r in records if r["method"]["name"] == "dense" or r["method"]["name"] in order]
    return sorted(chosen, key=lambda r: (r["ratio"], r["method"]["name"] != "dense", order.get(r["method"]["name"], -1),
                                         (r.get("calibration") or {}).get("seed") or 0))


def ablation_rows(records: list[dict[str, Any]], metric: str, digits: int = 2) -> list[list[str]]:
    rows = []
    for rec in records:
        layers = rec.get("layers") or []
        errs = [layer["calib_rel_error"] for layer in layers if layer.get("calib_rel_error") is not None]
        errs_c = [layer["calib_rel_error_compressed"] for layer in layers if "calib_rel_error_compressed" in layer]
        t = rec.get("timings_s", {})
        rows.append([
            _fmt(rec["ratio"]), rec["method"]["name"], _fmt((rec.get("calibration") or {}).get("seed")),
            _fmt(rec.get("achieved_ratio"), 4), _fmt(metric_value(rec, metric), digits),
            _fmt(sum(errs), 3) if errs else "—", _fmt(sum(errs) / len(errs), 4) if errs else "—",
            _fmt(sum(errs_c) / len(errs_c), 4) if errs_c else "—",
            _fmt(t.get("compress"), 1), _fmt(t.get("eval"), 1),
        ])
    return rows


def render(records: list[dict[str, Any]], metric: str = "wikitext2.ppl", digits: int = 2) -> str:
    header = ["ratio", "method", "calib seed", "achieved", metric, "sum calib err", "mean calib err",
              "mean err (compressed inputs)", "compress s", "eval s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in ablation_rows(records, metric, digits)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--metric", default="wikitext2.ppl")
    parser.add_argument("--methods", help="comma-separated method names, in table order (default: all)")
    parser.add_argument("--digits", type=int, default=2, help="decimals of the metric (e.g. 4 for cosines)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",")] if args.methods else None
    text = render(select(load_records(args.directory), methods), args.metric, args.digits)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
