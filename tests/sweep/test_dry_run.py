"""--dry-run: the grid with done / failed / missing per cell, from run keys alone (no weights)."""

from __future__ import annotations

import json

import pytest

from harness.cli import main
from harness.records import write_json_atomic
from harness.sweep.plan import plan_cells
from harness.sweep.spec import load_spec
from tests.sweep.conftest import small_spec


@pytest.fixture
def no_weights(monkeypatch):
    """Fail loudly if anything loads model weights."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", refuse)
    monkeypatch.setattr("harness.runs.session.load_model", refuse)


def test_dry_run_lists_done_failed_and_missing(tiny_model, tmp_path, write_spec, no_weights, capsys):
    results = tmp_path / "results"
    spec_path = write_spec(small_spec(tiny_model, results))
    cells = plan_cells(load_spec(spec_path))
    assert [(c.method, c.ratio) for c in cells] == [
        ("dense", 0.0), ("svd", 0.3), ("svd", 0.6), ("svd-llm", 0.3), ("svd-llm", 0.6),
    ]
    assert len({c.key for c in cells}) == 5
    dense, svd3, svd6, llm3, llm6 = cells
    write_json_atomic(dense.path, {"run_key": dense.key, "status": "ok"})
    write_json_atomic(svd6.path, {"run_key": svd6.key, "status": "ok"})
    write_json_atomic(llm3.path, {"run_key": llm3.key, "status": "failed", "error": "boom"})
    (results / f".{svd3.key}.abc.tmp").write_text('{"trunc')  # a killed writer's leftover: ignored

    assert main(["sweep", str(spec_path), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("sweep test: 1 model(s) x 2 method(s) x 2 ratio(s) x 1 seed(s) = 4 cell(s) + 1 dense")
    status = {line.split()[1]: line.split()[0] for line in lines[2:-1]}
    assert status == {dense.key: "done", svd3.key: "missing", svd6.key: "done", llm3.key: "failed", llm6.key: "missing"}
    assert lines[-1] == "2 done, 1 failed, 2 missing"


def test_dry_run_keys_follow_the_overrides(tiny_model, tmp_path, write_spec, no_weights, capsys):
    spec_path = write_spec(small_spec(tiny_model, tmp_path / "results"))
    keys = {c.key for c in plan_cells(load_spec(spec_path))}
    other = plan_cells(load_spec(spec_path, ["calibration.samples=4", "methods=[svd]", "ratios=[0.3]"]))
    assert [(c.method, c.ratio) for c in other] == [("dense", 0.0), ("svd", 0.3)]
    # the dense record does not depend on the calibration; the compressed cell does
    assert other[0].key in keys and other[1].key not in keys
    assert main(["sweep", str(spec_path), "--dry-run", "ratios=[0.3]", "methods=[svd]"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "0 done, 0 failed, 2 missing"
    assert not (tmp_path / "results").exists() or not list((tmp_path / "results").iterdir())
    json.dumps([c.key for c in other])
