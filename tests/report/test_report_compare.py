from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from report_fixtures import make_record, write_store

from harness.report.compare import check_scenario, compare
from harness.report.metrics import relative_change


def _store(tmp_path: Path, name: str, records: list[dict[str, Any]]) -> Path:
    return write_store(tmp_path / name, records)


def _scaled(rec: dict[str, Any], ppl: float = 1.0, acc: float = 1.0) -> dict[str, Any]:
    """A copy of ``rec`` with every perplexity times ``ppl`` and every accuracy times ``acc``."""
    rec = copy.deepcopy(rec)
    for name in ("wikitext2", "ptb"):
        rec["metrics"][name]["ppl"] *= ppl
    zs = rec["metrics"]["zeroshot"]
    zs["average"] *= acc
    for task in zs["tasks"].values():
        task["value"] *= acc
    return rec


@pytest.fixture
def baseline(tmp_path: Path) -> tuple[Path, list[dict[str, Any]]]:
    recs = [make_record("dense", 0.0), make_record("svd", 0.2), make_record("svd-llm", 0.2)]
    return _store(tmp_path, "baseline", recs), recs


def test_identical_stores_pass(baseline: tuple[Path, list[dict[str, Any]]]) -> None:
    base_dir, _ = baseline
    result = compare(base_dir, base_dir)
    assert result.exit_code == 0
    assert set(result.table["verdict"]) == {"ok"}
    assert "PASS" in result.summary()


def test_perplexity_up_ten_percent_is_worse(
    tmp_path: Path, baseline: tuple[Path, list[dict[str, Any]]]
) -> None:
    base_dir, recs = baseline
    cur = _store(tmp_path, "cur", [recs[0], recs[1], _scaled(recs[2], ppl=1.10)])
    result = compare(cur, base_dir, rtol=0.02)
    assert result.exit_code == 1
    worse = result.table[result.table["verdict"] == "worse"]
    assert set(worse["metric"]) == {"wikitext2.ppl", "ptb.ppl"}
    assert set(worse["method"]) == {"svd-llm"}
    assert worse["rel_change"].tolist() == pytest.approx([0.10, 0.10])
    assert "FAIL" in result.summary() and "svd-llm" in result.to_markdown()


def test_small_change_within_rtol_is_ok(tmp_path: Path, baseline: tuple[Path, list[dict[str, Any]]]) -> None:
    base_dir, recs = baseline
    cur = _store(tmp_path, "cur", [recs[0], recs[1], _scaled(recs[2], ppl=1.01, acc=0.99)])
    assert compare(cur, base_dir, rtol=0.02).exit_code == 0


def test_accuracy_down_is_worse(tmp_path: Path, baseline: tuple[Path, list[dict[str, Any]]]) -> None:
    base_dir, recs = baseline
    cur = _store(tmp_path, "cur", [recs[0], recs[1], _scaled(recs[2], acc=0.95)])
    result = compare(cur, base_dir)
    assert result.exit_code == 1
    assert "zeroshot.tasks.piqa.value" in set(result.table.loc[result.table["verdict"] == "worse", "metric"])


def test_better_is_not_a_failure(tmp_path: Path, baseline: tuple[Path, list[dict[str, Any]]]) -> None:
    base_dir, recs = baseline
    cur = _store(tmp_path, "cur", [recs[0], recs[1], _scaled(recs[2], ppl=0.9, acc=1.1)])
    result = compare(cur, base_dir)
    assert result.exit_code == 0
    t = result.table[
        (result.table["method"] == "svd-llm") & ~result.table["metric"].str.endswith("nonfinite_windows")
    ]
    assert set(t["verdict"]) == {"better"}


def test_missing_baseline_cell_fails(tmp_path: Path, baseline: tuple[Path, list[dict[str, Any]]]) -> None:
    base_dir, recs = baseline
    cur = _store(tmp_path, "cur", recs[:2])
    result = compare(cur, base_dir)
    assert result.exit_code == 1
    missing = result.table[result.table["verdict"] == "missing"]
    assert set(missing["method"]) == {"svd-llm"} and set(missing["note"]) == {"cell not in results"}


def test_failed_run_and_protocol_change_count_as_missing(
    tmp_path: Path, baseline: tuple[Path, list[dict[str, Any]]]
) -> None:
    base_dir, recs = baseline
    failed = make_record("svd-llm", 0.2, status="failed", error="Traceback\nRuntimeError: boom")
    failed["metrics"] = {}
    moved = copy.deepcopy(recs[1])
    moved["metrics"]["wikitext2"]["protocol"] = "wikitext2@4096"
    result = compare(_store(tmp_path, "cur", [recs[0], moved, failed]), base_dir)
    assert result.exit_code == 1
    notes = result.table.set_index(["method", "metric"])["note"]
    assert notes[("svd-llm", "wikitext2.ppl")] == "run failed: RuntimeError: boom"
    assert notes[("svd", "wikitext2.ppl")].startswith("protocol differs")
    assert result.table.set_index(["method", "metric"])["verdict"][("svd", "ptb.ppl")] == "ok"


def test_new_cells_do_not_fail(tmp_path: Path, baseline: tuple[Path, list[dict[str, Any]]]) -> None:
    base_dir, recs = baseline
    result = compare(_store(tmp_path, "cur", [*recs, make_record("adasvd", 0.2)]), base_dir)
    assert result.exit_code == 0 and (result.table["verdict"] == "new").sum() == 1


def test_seed_is_part_of_the_cell(tmp_path: Path, baseline: tuple[Path, list[dict[str, Any]]]) -> None:
    base_dir, recs = baseline
    other_seed = make_record("svd-llm", 0.2, seed=1)
    result = compare(_store(tmp_path, "cur", [recs[0], recs[1], other_seed]), base_dir)
    assert result.exit_code == 1 and result.counts.get("new") == 1


def test_metric_subset_and_per_metric_rtol(
    tmp_path: Path, baseline: tuple[Path, list[dict[str, Any]]]
) -> None:
    base_dir, recs = baseline
    cur = _store(tmp_path, "cur", [recs[0], recs[1], _scaled(recs[2], ppl=1.10)])
    assert compare(cur, base_dir, metrics=["piqa", "average"]).exit_code == 0
    assert compare(cur, base_dir, rtol={"wikitext2": 0.2, "ptb": 0.2}).exit_code == 0


def test_new_nonfinite_windows_are_a_regression(
    tmp_path: Path, baseline: tuple[Path, list[dict[str, Any]]]
) -> None:
    base_dir, recs = baseline
    broken = copy.deepcopy(recs[2])
    broken["metrics"]["wikitext2"]["nonfinite_windows"] = 3
    result = compare(_store(tmp_path, "cur", [recs[0], recs[1], broken]), base_dir)
    assert result.exit_code == 1
    assert list(result.problems()["metric"]) == ["wikitext2.nonfinite_windows"]


def test_relative_change_edge_cases() -> None:
    assert relative_change(0.0, 0.0) == 0.0
    assert relative_change(0.0, 1.0) == float("inf")
    assert relative_change(10.0, 11.0) == pytest.approx(0.1)


def _scenario(tmp_path: Path, **body: Any) -> Path:
    path = tmp_path / "scenario.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def test_check_scenario(store_dir: Path, tmp_path: Path) -> None:
    base = {"model": "toy-llama", "method": "svd-llm", "ratio": 0.2}
    ok = _scenario(
        tmp_path,
        **base,
        metrics={
            "wikitext2.ppl": {"value": 7.9, "rtol": 0.02, "protocol": "wikitext2@2048"},
            "piqa": {"value": 0.7},
        },
        recovery_threshold={"piqa": 0.85},
    )
    assert check_scenario(ok, store_dir) == []
    worse = _scenario(tmp_path, **base, metrics={"wikitext2.ppl": {"value": 7.0, "rtol": 0.02}})
    (msg,) = check_scenario(worse, store_dir)
    assert "wikitext2.ppl = 7.94 is worse than expected 7" in msg
    recovery = _scenario(tmp_path, **base, metrics={"wikitext2": {"value": 7.94}}, recovery_threshold=0.9)
    (msg,) = check_scenario(recovery, store_dir)  # dense/compressed = 5.68 / 7.94 = 0.715
    assert "recovery 0.7154 < threshold 0.9000" in msg
    # Seeds are averaged: (13.11 + 13.31) / 2 = 13.21.
    seeds = _scenario(tmp_path, model="toy-llama", method="svd-llm", ratio=0.4, metrics={"wikitext2": 13.21})
    assert check_scenario(seeds, store_dir) == []


def test_check_scenario_limit_missing_and_typos(store_dir: Path, tmp_path: Path) -> None:
    smoke = {"model": "toy-llama", "method": "svd-llm", "ratio": 0.6, "metrics": {"wikitext2": 30.1}}
    (msg,) = check_scenario(_scenario(tmp_path, **smoke), store_dir)
    assert "no matching record" in msg  # --limit records only count when asked for
    assert check_scenario(_scenario(tmp_path, **smoke, limit=10), store_dir) == []
    with pytest.raises(ValueError, match="did you mean 'metrics'"):
        check_scenario(_scenario(tmp_path, model="m", method="svd", ratio=0.2, metric={"x": 1}), store_dir)
