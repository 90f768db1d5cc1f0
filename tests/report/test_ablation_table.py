"""benchmarks.ablation_table: selection, order and the error columns, on hand-made records."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.ablation_table import load_records, render, select


def _record(path: Path, method: str, ratio: float, ppl: float, errs: list[float], seed: int | None = None) -> None:
    rec = {"schema_version": 1, "run_key": path.stem, "model": {"id": "m"}, "status": "ok",
           "method": {"name": method}, "ratio": ratio, "provenance": {"seed": seed},
           "achieved_ratio": ratio, "metrics": {"wikitext2": {"ppl": ppl}},
           "layers": [{"calib_rel_error": e} for e in errs], "timings_s": {"compress": 1.0, "eval": 2.0}}
    path.write_text(json.dumps(rec))


def test_select_orders_dense_first_then_listed_methods(tmp_path: Path):
    _record(tmp_path / "a.json", "svd-llm", 0.4, 210.0, [0.1, 0.3])
    _record(tmp_path / "b.json", "adasvd", 0.4, 205.0, [0.2, 0.2])
    _record(tmp_path / "c.json", "svd", 0.4, 300.0, [0.5, 0.5])
    _record(tmp_path / "d.json", "dense", 0.0, 200.0, [])
    (tmp_path / "e.json").write_text(json.dumps({"schema_version": 1, "run_key": "e", "model": {"id": "m"},
                                                 "status": "failed", "method": {"name": "svd"}, "ratio": 0.4}))
    (tmp_path / "f.json").write_text(json.dumps([{"method": "svd-llm"}]))  # a diagnostics dump, not a record
    records = load_records(tmp_path)
    assert len(records) == 4  # the failed record and the non-record JSON are left out
    chosen = select(records, ["svd-llm", "adasvd"])
    assert [r["method"]["name"] for r in chosen] == ["dense", "svd-llm", "adasvd"]
    table = render(chosen)
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    assert len(lines) == 5 and lines[3].startswith("| 0.40 | svd-llm | 1 | — | 0.4000 | 210.00 | 0.400 | 0.2000 |")
    assert "n = 1: a single seed, no spread" in table and "±" not in table
    assert [r["method"]["name"] for r in select(records, None)] == ["dense", "adasvd", "svd", "svd-llm"]


def test_seeds_are_aggregated_into_mean_and_spread(tmp_path: Path):
    _record(tmp_path / "d.json", "dense", 0.0, 200.0, [], seed=0)
    _record(tmp_path / "a0.json", "svd-llm", 0.4, 210.0, [0.1, 0.3], seed=0)
    _record(tmp_path / "a1.json", "svd-llm", 0.4, 212.0, [0.1, 0.5], seed=1)
    _record(tmp_path / "a2.json", "svd-llm", 0.4, 214.0, [0.1, 0.7], seed=2)
    _record(tmp_path / "b.json", "adasvd", 0.4, 205.0, [0.2, 0.2], seed=0)
    table = render(select(load_records(tmp_path), ["svd-llm", "adasvd"]))
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    assert lines[2].startswith("| 0.00 | dense | 1 | — | 0.0000 | 200.00 |")
    # ppl 210/212/214: mean 212, sample s.d. 2; summed errors 0.4/0.6/0.8: mean 0.6, s.d. 0.2.
    assert lines[3].startswith("| 0.40 | svd-llm | 3 | 0, 1, 2 | 0.4000 | 212.00 ± 2.00 | 0.600 ± 0.200 | 0.3000 ± 0.1000 |")
    assert lines[4].startswith("| 0.40 | adasvd | 1 | 0 | 0.4000 | 205.00 | 0.400 | 0.2000 |")
    assert "sample standard deviation" in table and "n = 1: a single seed, no spread" in table
