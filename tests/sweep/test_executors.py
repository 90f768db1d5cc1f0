"""Executors: submitit (through its local executor), local-gpus, and clear refusals."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness.cli import main
from harness.records import write_json_atomic
from harness.runs import RunConfig
from harness.sweep.executors import (
    ExecutorUnavailableError,
    InProcessExecutor,
    LocalGpusExecutor,
    SubmititExecutor,
    make_executor,
)
from harness.sweep.plan import Cell, group_cells
from harness.sweep.run import run_sweep
from harness.sweep.slurm import JobState, SchedulerUnreachableError
from harness.sweep.spec import parse_spec
from harness.sweep.submissions import SubmittedJob, latest_jobs, record_submission
from harness.sweep.worker import Outcome
from tests.sweep.conftest import ROOT, records, small_spec


def fake_cells() -> list[Cell]:
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
        "slurm_partition": "gpu", "slurm_array_parallelism": 4, "slurm_additional_parameters": {"requeue": True},
    }
    # no GPU: no --gpus-per-node at all; extra sbatch options pass through
    cpu = parse_spec(small_spec(tmp_path / "m", tmp_path / "results"),
                     ["submitit.gpus_per_node=0", "submitit.sbatch={account: proj, qos: high}"])
    params = SubmititExecutor(cpu.submitit, cpu.results, cpu.name).parameters()
    assert "gpus_per_node" not in params
    assert params["slurm_additional_parameters"] == {"requeue": True, "account": "proj", "qos": "high"}


def test_submitit_array_tasks_are_cells_or_groups(tmp_path):
    pytest.importorskip("submitit")
    spec = parse_spec(small_spec(tmp_path / "m", tmp_path / "results"))
    assert spec.submitit.unit == "cell"
    per_cell = SubmititExecutor(spec.submitit, spec.results, spec.name).units(fake_cells())
    assert [[c.key for c in u] for u in per_cell] == [["k0"], ["k1"], ["k3"], ["k2"]]  # grouped order
    grouped = parse_spec(small_spec(tmp_path / "m", tmp_path / "results"), ["submitit.unit=group"])
    per_group = SubmititExecutor(grouped.submitit, grouped.results, grouped.name).units(fake_cells())
    assert [[c.key for c in u] for u in per_group] == [["k0", "k1", "k3"], ["k2"]]


@pytest.mark.integration
def test_submitit_local_runs_a_two_cell_sweep(tiny_model, tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    # Jobs are fresh interpreters: they need this checkout importable and the same private cache.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    results = tmp_path / "results"
    spec = parse_spec(small_spec(tiny_model, results, methods=["svd"], ratios=[0.3, 0.6]),
                      ["submitit.cluster=local", "submitit.gpus_per_node=0", "submitit.timeout_min=10",
                       "submitit.unit=group"])
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


class FakeJob:
    """A submitit job as the SLURM follower sees it: an id, a result pickle path, a log."""

    def __init__(self, job_id: str, folder: Path, outcomes: list[Outcome] | None = None) -> None:
        self.job_id = job_id
        self.paths = SimpleNamespace(result_pickle=folder / f"{job_id}_result.pkl", stderr=folder / f"{job_id}.err")
        self.outcomes = outcomes

    def result(self) -> list[Outcome]:
        return self.outcomes

    def stderr(self) -> str | None:
        return self.paths.stderr.read_text() if self.paths.stderr.is_file() else None


def test_submitit_on_slurm_follows_jobs_with_squeue(tmp_path, monkeypatch):
    """One array for the missing cells; a job still running from an earlier submission is followed,
    not resubmitted; cancelled tasks leave no record, killed ones a failed record with their log."""
    pytest.importorskip("submitit")
    import harness.sweep.executors as executors

    results, logs = tmp_path / "results", tmp_path / "logs"
    logs.mkdir()
    run = RunConfig(model="m", methods=("svd",), ratios=(0.2,), results=str(results))
    cells = [Cell(f"k{i}", "m", "svd" if i else "dense", 0.1 * i, 0, run) for i in range(5)]
    write_json_atomic(cells[3].path, {"run_key": "k3", "status": "ok"})  # finished just before its job was cancelled
    record_submission(results, {"k4": SubmittedJob("30_4", "slurm", 2, str(logs / "30_4.err"), 1.0, str(logs))})
    submitted: list[list[str]] = []

    class FakeAutoExecutor:
        cluster = "slurm"

        def __init__(self, folder: str, cluster: str | None) -> None:
            assert cluster == "slurm"

        def update_parameters(self, **params: object) -> None:
            assert params["slurm_additional_parameters"] == {"requeue": True}

        def map_array(self, fn: object, units: list[list[Cell]]) -> list[FakeJob]:
            submitted.extend([c.key for c in u] for u in units)
            return [FakeJob(f"40_{i}", logs, [Outcome(u[0], "ok")]) for i, u in enumerate(units)]

    followed = FakeJob("30_4", logs, [Outcome(cells[4], "failed", "requeue interrupted")])

    def slurm_job(folder: str, job_id: str) -> FakeJob:
        assert (folder, job_id) == (str(logs), "30_4")
        return followed

    (logs / "40_0_result.pkl").touch()
    (logs / "30_4_result.pkl").touch()  # left by the attempt its requeue interrupted: not its result
    (logs / "40_2.err").write_text("loading\nslurmstepd: error: Detected 1 oom_kill event\n")
    states = {"40_0": JobState("COMPLETED"), "40_1": JobState("CANCELLED"), "40_2": JobState("OUT_OF_MEMORY"),
              "40_3": JobState("CANCELLED"), "30_4": JobState("RUNNING")}
    calls = []

    def fake_states(ids):
        calls.append(sorted(ids))
        if len(calls) == 2:  # a controller restart in the middle: no job counts as ended
            raise SchedulerUnreachableError("squeue exited 1: Unable to contact slurm controller")
        return {i: states[i] for i in ids if i in states}

    monkeypatch.setattr(executors, "job_states", fake_states)
    monkeypatch.setattr(executors, "_RESULT_GRACE_S", 0.0)
    spec = parse_spec(small_spec(tmp_path / "m", results), ["submitit.cluster=slurm", "submitit.gpus_per_node=0"])
    ex = SubmititExecutor(spec.submitit, results, spec.name, poll_s=0.01)
    ex.submitit = SimpleNamespace(AutoExecutor=FakeAutoExecutor, SlurmJob=slurm_job)

    real_sleep = executors.time.sleep

    def sleep(seconds: float) -> None:  # 30_4's next attempt ends between two looks
        if len(calls) == 3:
            other = Cell("kx", "m", "svd", 0.5, 0, run)  # a cell of its group done in an earlier run
            followed.outcomes = [Outcome(other, "ok"), Outcome(cells[4], "ok")]
            states["30_4"] = JobState("COMPLETED")
        real_sleep(0.01)

    monkeypatch.setattr(executors.time, "sleep", sleep)
    outcomes = {o.cell.key: o for o in ex.run_cells(cells)}
    assert calls[0] == ["30_4"]  # _attach asks about the earlier submission's job first
    assert calls[1] == ["30_4", "40_0", "40_1", "40_2", "40_3"] and len(calls) >= 4
    assert submitted == [["k0"], ["k1"], ["k2"], ["k3"]]  # k4's job is still running: followed instead
    assert {k: o.status for k, o in outcomes.items()} == {
        "k0": "ok", "k1": "cancelled", "k2": "failed", "k3": "ok", "k4": "ok"}
    assert outcomes["k1"].error == "job 40_1 CANCELLED" and not cells[1].path.exists()
    error = json.loads(cells[2].path.read_text())["error"]
    assert error.startswith("SLURM job 40_2 OUT_OF_MEMORY without a result; log ") and error.endswith("oom_kill event")
    assert {k: j.job_id for k, j in latest_jobs(results).items()} == {
        "k0": "40_0", "k1": "40_1", "k2": "40_2", "k3": "40_3", "k4": "30_4"}
    assert latest_jobs(results)["k0"].folder == ex.folder


def test_a_preempted_job_is_waited_for_until_requeued_or_given_up(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    import harness.sweep.executors as executors

    run = RunConfig(model="m", methods=("svd",), ratios=(0.2,), results=str(tmp_path / "results"))
    requeued, lost = Cell("k1", "m", "svd", 0.2, 0, run), Cell("k2", "m", "svd", 0.4, 0, run)
    jobs = [FakeJob("7_0", tmp_path, [Outcome(requeued, "ok")]), FakeJob("7_1", tmp_path)]
    # 7_0: preempted, requeued, runs again, completes; 7_1: preempted for good (PreemptMode=CANCEL).
    timeline = iter([{"7_0": "PREEMPTED"}, {"7_0": "PENDING"}, {"7_0": "RUNNING"}, {"7_0": "COMPLETED"}])

    def fake_states(ids):
        now = next(timeline, {"7_0": "COMPLETED"})
        if now["7_0"] == "COMPLETED":
            jobs[0].paths.result_pickle.touch()
        return {"7_0": JobState(now["7_0"]), "7_1": JobState("PREEMPTED")}

    monkeypatch.setattr(executors, "job_states", fake_states)
    monkeypatch.setattr(executors, "_REQUEUE_GRACE_S", 0.05)
    spec = parse_spec(small_spec(tmp_path / "m", tmp_path / "results"))
    outcomes = SubmititExecutor(spec.submitit, tmp_path / "results", poll_s=0.02)._follow_slurm(
        [(jobs[0], [requeued]), (jobs[1], [lost])])
    assert sorted((o.cell.key, o.status, o.error) for o in outcomes) == [
        ("k1", "ok", None), ("k2", "cancelled", "job 7_1 PREEMPTED")]
    assert not lost.path.exists()  # no failed record: the next run computes it
