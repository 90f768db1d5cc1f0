"""A failing cell is recorded with its traceback and does not stop the others; --retry-failed."""

from __future__ import annotations

import json

import pytest

import harness.runs.session
from harness.cli import main
from harness.report.store import read_records
from harness.runs import RunConfig
from harness.sweep.plan import Cell
from harness.sweep.run import run_sweep
from harness.sweep.spec import parse_spec
from harness.sweep.worker import record_failure
from tests.sweep.conftest import records, small_spec


def test_failure_record_is_a_valid_store_record(tmp_path):
    run = RunConfig(model=str(tmp_path / "some-model"), methods=("svd",), ratios=(0.4,), results=str(tmp_path))
    cell = Cell("0123456789abcdef0123", "some-model", "svd", 0.4, 0, run)
    outcome = record_failure(cell, "Traceback ...\nRuntimeError: boom")
    assert outcome.status == "failed"
    (rec,) = read_records(tmp_path)  # the report store's validation accepts it
    assert rec["status"] == "failed" and rec["run_key"] == cell.key and rec["error"].endswith("boom")
    assert rec["method"]["name"] == "svd" and rec["ratio"] == 0.4
    # Another process's finished record (unsigned here: flipping a signed record's status is tampering).
    cell.path.write_text(json.dumps({k: v for k, v in rec.items() if k != "digest"} | {"status": "ok"}))
    assert record_failure(cell, "late").status == "ok"  # never overwrites a finished record


@pytest.mark.integration
def test_failed_cell_is_recorded_skipped_then_retried(tiny_model, tmp_path, monkeypatch, write_spec):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    spec = parse_spec(small_spec(tiny_model, results, methods=["svd"]))
    real = harness.runs.session.compress_model

    def flaky(model, layout, method, ratio, *args, **kwargs):
        if ratio == 0.6:
            raise RuntimeError("injected failure at 0.6")
        return real(model, layout, method, ratio, *args, **kwargs)

    monkeypatch.setattr(harness.runs.session, "compress_model", flaky)
    first = run_sweep(spec)
    assert [(o.cell.method, o.cell.ratio, o.status) for o in first.outcomes] == [
        ("dense", 0.0, "ok"), ("svd", 0.3, "ok"), ("svd", 0.6, "failed"),
    ]
    failed = first.failed[0].cell
    rec = json.loads(failed.path.read_text())
    assert rec["status"] == "failed" and "RuntimeError: injected failure at 0.6" in rec["error"]
    assert "Traceback" in rec["error"]

    monkeypatch.setattr(harness.runs.session, "compress_model", real)
    spec_path = write_spec(small_spec(tiny_model, results, methods=["svd"]))
    assert main(["sweep", str(spec_path)]) == 1  # reported and skipped: the sweep is not complete
    assert json.loads(failed.path.read_text())["status"] == "failed"
    skipped = run_sweep(spec)
    assert skipped.outcomes == [] and [c.key for c in skipped.skipped_failed] == [failed.key]

    retried = run_sweep(spec, retry_failed=True)
    assert [(o.cell.key, o.status) for o in retried.outcomes] == [(failed.key, "ok")]
    assert retried.ok and len(records(results)) == 3
    assert all(json.loads(p.read_text())["status"] == "ok" for p in records(results).values())
