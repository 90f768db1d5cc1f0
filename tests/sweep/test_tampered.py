"""A record edited after it was written (its perplexity, its ratio, its key) is never counted as done:
the sweep's dry run shows it ``tampered`` and names the file, and ``run`` / ``sweep`` move it aside
and recompute the cell."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from harness.cli import main
from harness.integrity import SIGNED, verify_record
from harness.runs import RunConfig, run
from harness.sweep.plan import plan_cells
from harness.sweep.run import run_sweep
from harness.sweep.spec import parse_spec
from tests.sweep.conftest import small_spec

pytestmark = pytest.mark.integration

EDITS = {
    "perplexity": lambda r: r["metrics"]["wikitext2"].update(ppl=50.0),
    "ratio": lambda r: r.update(ratio=0.6),
    "key": lambda r: r.update(run_key="0123456789abcdef0123"),
}


def test_a_tampered_record_is_reported_and_recomputed(tiny_model: Path, tmp_path: Path, write_spec, monkeypatch,
                                                        caplog, capsys) -> None:
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    raw = small_spec(tiny_model, results, methods=["svd"], ratios=[0.3])
    spec_path = write_spec(raw)
    assert run_sweep(parse_spec(raw)).ok
    cell = next(c for c in plan_cells(parse_spec(raw)) if not c.is_dense)
    good = cell.path.read_text()

    for name, edit in EDITS.items():  # the dry run (no weights) sees each edit and names the file
        rec = json.loads(good)
        edit(rec)
        cell.path.write_text(json.dumps(rec))
        caplog.clear()
        with caplog.at_level(logging.ERROR):
            assert main(["sweep", str(spec_path), "--dry-run"]) == 0
        out = capsys.readouterr().out
        assert out.splitlines()[-1] == "1 done, 0 failed, 0 missing, 1 tampered (recomputed by the next run)", name
        assert f"tampered record {cell.path}" in caplog.text, name

    # The sweep recomputes the cell whose perplexity was edited, after moving the record aside.
    rec = json.loads(good)
    EDITS["perplexity"](rec)
    cell.path.write_text(json.dumps(rec))
    again = run_sweep(parse_spec(raw))
    assert [(o.cell.key, o.status) for o in again.outcomes] == [(cell.key, "ok")]
    fresh = json.loads(cell.path.read_text())
    assert fresh["metrics"] == json.loads(good)["metrics"] and verify_record(fresh, cell.path).status == SIGNED
    assert len(list(results.glob(f"{cell.path.name}.corrupt-*"))) == 1

    # `svdbench run` does the same with a record whose key was edited.
    rec = json.loads(good)
    EDITS["key"](rec)
    cell.path.write_text(json.dumps(rec))
    cfg = cell.run
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        run(RunConfig(**{**cfg.__dict__, "methods": ("svd",), "ratios": (0.3,)}))
    assert f"{cell.path}: tampered record (" in caplog.text
    assert "its run key '0123456789abcdef0123' is not its file name" in caplog.text
    assert json.loads(cell.path.read_text())["run_key"] == cell.key
