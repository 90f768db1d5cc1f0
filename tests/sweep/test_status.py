"""--status: pending, running, done or failed per cell, from records, running markers and (faked) SLURM."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

import harness.sweep.status as status_mod
from harness.cli import main
from harness.records import write_json_atomic
from harness.runs import RunConfig
from harness.sweep.markers import Marker, clear_running, mark_running, read_marker
from harness.sweep.plan import Cell, plan_cells
from harness.sweep.slurm import JobState, SchedulerUnreachableError, job_states
from harness.sweep.spec import load_spec
from harness.sweep.status import CellState, cell_states, first_error_line, log_error_line
from harness.sweep.submissions import SubmittedJob, latest_jobs, record_submission
from harness.sweep.worker import record_failure
from tests.sweep.conftest import small_spec

HOST = socket.gethostname()


@pytest.fixture(autouse=True)
def outside_slurm(monkeypatch):
    """Markers name the SLURM job of the process that writes them: these tests are outside any."""
    for name in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)

TRACEBACK = """Traceback (most recent call last):
  File "x.py", line 1, in <module>
    boom()
ValueError: the cause

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "x.py", line 3, in <module>
RuntimeError: the effect
"""


def test_first_error_line():
    assert first_error_line(TRACEBACK) == "ValueError: the cause"  # the root of a chain
    assert first_error_line("submitit job 3_1 failed: boom\nmore") == "submitit job 3_1 failed: boom"
    assert first_error_line("\n\n  indented first\n") == "indented first"
    assert first_error_line(None) == "" and first_error_line("") == ""
    log = "submitit INFO - Starting\nslurmstepd: error: *** JOB 7 ON n1 CANCELLED AT 2026 ***\n"
    assert log_error_line(log) == "slurmstepd: error: *** JOB 7 ON n1 CANCELLED AT 2026 ***"
    assert log_error_line("INFO starting\n" + TRACEBACK) == "ValueError: the cause"
    assert log_error_line("all fine\n") == ""


def fake_cells(results: Path) -> list[Cell]:
    run = RunConfig(model="m", methods=("svd",), ratios=(0.2, 0.4, 0.6), results=str(results))
    return [Cell("k0", "m", "dense", 0.0, 0, run)] + [
        Cell(f"k{i}", "m", "svd", r, 0, run) for i, r in enumerate((0.2, 0.4, 0.6, 0.8, 0.9, 0.95), 1)
    ]


def test_cell_states_from_records_markers_and_the_scheduler(tmp_path, monkeypatch):
    results = tmp_path / "results"
    dense, ok_failed, mine, stale, queued, cancelled, oom = cells = fake_cells(results)
    write_json_atomic(dense.path, {"run_key": dense.key, "status": "ok"})
    record_failure(ok_failed, TRACEBACK)
    mark_running(mine)  # this process: alive
    write_json_atomic(results / ".sweep" / "running" / f"{stale.key}.json",
                      {"key": stale.key, "host": HOST, "pid": 2**22 + 17, "started": 0.0})
    log_file = tmp_path / "oom.err"
    log_file.write_text("INFO loading\nslurmstepd: error: Detected 1 oom_kill event in StepId=9.0\n")
    jobs = {c.key: SubmittedJob(f"9_{i}", "slurm", 1, str(log_file), 100.0) for i, c in enumerate(cells)}
    record_submission(results, jobs)
    seen = {}

    def fake_states(ids):
        seen["ids"] = set(ids)
        return {"9_4": JobState("PENDING", "JobArrayTaskLimit"), "9_5": JobState("CANCELLED"),
                "9_6": JobState("OUT_OF_MEMORY"), "9_2": JobState("RUNNING", "None")}

    monkeypatch.setattr(status_mod, "job_states", fake_states)
    states = cell_states(cells, results)
    assert seen["ids"] == {f"9_{i}" for i in range(7)}
    assert {k: (s.status, s.job, s.detail) for k, s in states.items()} == {
        "k0": ("done", "9_0", ""),
        "k1": ("failed", "9_1", "ValueError: the cause"),
        "k2": ("running", "9_2", f"pid {os.getpid()} on {HOST}"),
        "k3": ("pending", "9_3", "job 9_3 unknown to squeue and sacct here"),  # stale marker, pid gone
        "k4": ("pending", "9_4", "job 9_4 PENDING (JobArrayTaskLimit)"),
        "k5": ("pending", "9_5", "job 9_5 CANCELLED; not run yet"),
        "k6": ("failed", "9_6", "job 9_6 OUT_OF_MEMORY: slurmstepd: error: Detected 1 oom_kill event in "
                                "StepId=9.0 (no record)"),
    }
    clear_running(mine)
    assert read_marker(results, mine.key) is None
    clear_running(stale)  # another process's marker is left alone
    assert read_marker(results, stale.key) == Marker(stale.key, HOST, 2**22 + 17, 0.0)


def test_a_slurm_marker_follows_its_job_state(tmp_path, monkeypatch):
    results = tmp_path / "results"
    cell = fake_cells(results)[1]
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    mark_running(cell)
    assert read_marker(results, cell.key).slurm_job == "12_3"
    monkeypatch.setattr(status_mod, "job_states", lambda ids: {"12_3": JobState("RUNNING", "None")})
    assert cell_states([cell], results)[cell.key].detail == f"job 12_3 RUNNING on {HOST}"
    # the job was killed (SIGKILL leaves the marker): the scheduler, not the pid, decides
    monkeypatch.setattr(status_mod, "job_states", lambda ids: {"12_3": JobState("CANCELLED")})
    assert cell_states([cell], results)[cell.key].status == "pending"


def test_latest_submission_wins(tmp_path):
    job = SubmittedJob("5_0", "slurm", 1, "log", 10.0, "/f/%j")
    record_submission(tmp_path, {"a": job, "b": SubmittedJob("5_1", "slurm", 1, "log", 10.0)})
    record_submission(tmp_path, {"b": SubmittedJob("8", "slurm", 1, "log", 20.0)})
    assert {k: j.job_id for k, j in latest_jobs(tmp_path).items()} == {"a": "5_0", "b": "8"}
    assert latest_jobs(tmp_path)["a"] == job
    assert latest_jobs(tmp_path / "nothing") == {}


def fake_bin(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def test_job_states_squeue_then_sacct(tmp_path, monkeypatch):
    # squeue fails as a whole when one id is unknown (7); asked one array at a time it answers for
    # 5; sacct answers for the old array 7 ("CANCELLED by 0", steps skipped).
    fake_bin(tmp_path, "squeue", 'case "$*" in *--jobs=5,7*) echo "slurm_load_jobs error: Invalid job id" >&2; exit 1;;\n'
                                 '*--jobs=5*) printf "5_0|RUNNING|None\\n5_1|PENDING|JobArrayTaskLimit\\n";;\n'
                                 '*) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac\n')
    fake_bin(tmp_path, "sacct", 'printf "7_2|CANCELLED by 0|None\\n7_2.batch|CANCELLED|\\n"\n')
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert job_states(["5_0", "5_1", "7_2", "9_9"]) == {
        "5_0": JobState("RUNNING", "None"), "5_1": JobState("PENDING", "JobArrayTaskLimit"),
        "7_2": JobState("CANCELLED", "None"),
    }
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert job_states(["5_0"]) == {}  # no SLURM here
    down = tmp_path / "down"
    down.mkdir()
    fake_bin(down, "squeue", 'echo "slurm_load_jobs error: Unable to contact slurm controller" >&2; exit 1\n')
    monkeypatch.setenv("PATH", f"{down}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(SchedulerUnreachableError, match="Unable to contact slurm controller"):
        job_states(["5_0"])
    cell = fake_cells(tmp_path / "results")[1]
    record_submission(tmp_path / "results", {cell.key: SubmittedJob("5_0", "slurm", 1, "log", 1.0)})
    assert cell_states([cell], tmp_path / "results")[cell.key] == CellState(
        "pending", "5_0", "job 5_0: scheduler unreachable (squeue exited 1: slurm_load_jobs error: Unable to "
        "contact slurm controller)")


def test_status_cli_without_a_scheduler(tiny_model, tmp_path, write_spec, capsys):
    results = tmp_path / "results"
    spec_path = write_spec(small_spec(tiny_model, results))
    dense, svd3, svd6, llm3, llm6 = plan_cells(load_spec(spec_path))
    write_json_atomic(dense.path, {"run_key": dense.key, "status": "ok"})
    record_failure(svd6, TRACEBACK)
    mark_running(llm3)
    try:
        assert main(["sweep", str(spec_path), "--status"]) == 0
    finally:
        clear_running(llm3)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"sweep test: 5 cell(s); results in {results.resolve()}"
    assert lines[1].split() == ["status", "run", "key", "model", "method", "ratio", "seed", "job", "detail"]
    rows = {line.split()[1]: line.split(maxsplit=7) for line in lines[2:-1]}
    assert rows[dense.key][0] == "done" and rows[svd3.key][0] == "pending" and rows[llm6.key][0] == "pending"
    assert rows[svd6.key][0] == "failed" and rows[svd6.key][6:] == ["-", "ValueError: the cause"]
    assert rows[llm3.key][0] == "running" and rows[llm3.key][6:] == ["-", f"pid {os.getpid()} on {HOST}"]
    assert lines[-1] == "1 done, 1 running, 2 pending, 1 failed"
    with pytest.raises(SystemExit):
        main(["sweep", str(spec_path), "--status", "--dry-run"])  # one or the other
