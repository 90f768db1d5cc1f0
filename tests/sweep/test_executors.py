"""Executors: submitit (through its local executor), local-gpus, and clear refusals."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from harness.cli import main
from harness.sweep.executors import (
    ExecutorUnavailableError,
    InProcessExecutor,
    LocalGpusExecutor,
    SubmititExecutor,
    make_executor,
)
from harness.sweep.plan import Cell, group_cells
from harness.sweep.run import run_sweep
from harness.sweep.spec import parse_spec
from tests.sweep.conftest import ROOT, records, small_spec


def fake_cells() -> list[Cell]:
    from harness.runner import RunConfig

    a = RunConfig(model="m", methods=("svd",), ratios=(0.2, 0.4), seed=0)
    b = RunConfig(model="m", methods=("svd",), ratios=(0.2, 0.4), seed=1)
    return [Cell("k0", "m", "dense", 0.0, 0, a), Cell("k1", "m", "svd", 0.2, 0, a),
            Cell("k2", "m", "svd", 0.2, 1, b), Cell("k3", "m", "svd", 0.4, 0, a)]


def test_groups_share_model_calibration_seed_and_evals():
    groups = group_cells(fake_cells())
    assert [[c.key for c in g] for g in groups] == [["k0", "k1", "k3"], ["k2"]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a CPU-only machine")
def test_local_gpus_refuses_without_gpus(tmp_path, write_spec):
    with pytest.raises(ExecutorUnavailableError) as info:
        LocalGpusExecutor()
    assert str(info.value) == (
        "--executor local-gpus needs CUDA GPUs, but torch sees none on this machine; "
        "use --executor inprocess here (or --executor submitit for a cluster)"
    )
    # the CLI refuses before planning anything (the model does not even exist)
    spec = write_spec(small_spec(tmp_path / "no-such-model", tmp_path / "results"))
    assert main(["sweep", str(spec), "--executor", "local-gpus"]) == 2


def test_submitit_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit -> ImportError
    spec = parse_spec(small_spec(tmp_path / "m", tmp_path / "results"))
    with pytest.raises(ExecutorUnavailableError, match=r"pip install 'svdbench\[slurm\]'"):
        make_executor("submitit", spec)
    assert isinstance(make_executor("inprocess", spec), InProcessExecutor)


def test_submitit_parameters(tmp_path):
    pytest.importorskip("submitit")
    spec = parse_spec(small_spec(tmp_path / "m", tmp_path / "results"),
                      ["submitit.partition=gpu", "submitit.mem_gb=64", "submitit.array_parallelism=4"])
    ex = SubmititExecutor(spec.submitit, spec.results, spec.name)
    assert ex.folder == str((tmp_path / "results" / ".submitit" / "%j").resolve())
    assert ex.parameters() == {
        "name": "svdbench-test", "timeout_min": 240, "gpus_per_node": 1, "cpus_per_task": 8, "mem_gb": 64.0,
        "slurm_partition": "gpu", "slurm_array_parallelism": 4,
    }


@pytest.mark.integration
def test_submitit_local_runs_a_two_cell_sweep(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    # Jobs are fresh interpreters: they need this checkout importable and the same private cache.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    spec = parse_spec(small_spec(tiny_model, results, methods=["svd"], ratios=[0.3, 0.6]),
                      ["submitit.cluster=local", "submitit.gpus_per_node=0", "submitit.timeout_min=10"])
    result = run_sweep(spec, executor="submitit")
    assert [(o.cell.method, o.cell.ratio, o.status) for o in result.outcomes] == [
        ("dense", 0.0, "ok"), ("svd", 0.3, "ok"), ("svd", 0.6, "ok"),
    ]
    assert len(records(results)) == 3
    assert all(json.loads(p.read_text())["status"] == "ok" for p in records(results).values())
    jobs = [p for p in (results / ".submitit").iterdir() if p.name != "%j"]
    assert len(jobs) == 1  # one job per (model, calibration, seed) group
    assert "Exiting after successful completion" in next(jobs[0].glob("*_log.err")).read_text()
    # any executor resumes any sweep: nothing is left for the in-process one
    again = run_sweep(spec, executor="inprocess")
    assert again.outcomes == [] and again.ok


@pytest.mark.integration
def test_local_gpus_workers_take_groups_from_the_queue(tmp_path, monkeypatch):
    """The queue / spawned-worker path, pinned to a named GPU id; on a CPU-only machine the
    groups fail fast (their model does not exist), which still travels the whole path."""
    from harness.runner import RunConfig

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    cells = []
    for seed in (0, 1):
        run = RunConfig(model=str(tmp_path / "missing-model"), methods=("svd",), ratios=(0.4,), seed=seed,
                        results=str(tmp_path / "results"))
        cells.append(Cell(f"{seed:020d}", "missing-model", "svd", 0.4, seed, run))
    outcomes = LocalGpusExecutor(gpus=["0"]).run_cells(cells)
    assert sorted((o.cell.key, o.status) for o in outcomes) == [(c.key, "failed") for c in cells]
    assert all("missing-model" in o.error for o in outcomes)
    assert set(records(tmp_path / "results")) == {c.key for c in cells}
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # the parent's environment is restored
