"""A sweep on a real scheduler: a one-node SLURM on localhost runs the submitit executor's job array.

The tiny testbed model ``tiny-llama`` x {svd, svd-llm} x {0.3, 0.6} (plus the dense cell) on
CPU, one array task per cell, two at a time. Mid-run, one task is signalled like a preempted job
(submitit checkpoints and requeues it) and another is cancelled with ``scancel``. The first run
ends with four records and the cancelled cell reported; a rerun submits exactly that cell. Every
record then equals the one an in-process run of the same spec wrote.

Needs root and Debian's packages (installed here with apt-get when missing); otherwise skipped
with the reason. Run it alone with its log shown:
``python -m pytest -m slurm -o log_cli=true --log-cli-level=INFO tests/sweep/test_slurm_live.py``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from harness.cli import main
from harness.sweep.markers import read_marker
from harness.sweep.plan import Cell, plan_cells
from harness.sweep.spec import load_spec
from harness.sweep.submissions import latest_jobs
from harness.sweep.worker import DELAY_ENV
from tests.sweep.conftest import ROOT, records
from tests.sweep.slurm_cluster import LocalSlurm, SlurmUnavailable, ensure_packages
from tests.utils import DATA

pytestmark = [pytest.mark.slurm, pytest.mark.integration]

log = logging.getLogger("svdbench.test.slurm")

# Seconds each compressed cell of the first run sleeps before computing: long enough that a signal
# sent once the cell has started lands before the cell ends, even after a --status call in between
# (on a loaded machine) and with SIGKILL following scancel by KillWait=2 s.
CELL_DELAY_S = 15
# Fields that differ between two runs of the same cell by nature: wall times, peak memory, whether
# the statistics came from the cache, the probes' costs (seconds), and the digest, which covers them.
RUN_SPECIFIC = {"timings_s", "peak_memory_bytes", "statistics_cached", "probes", "digest"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> LocalSlurm:
    """A running one-node SLURM, stopped (by process id) when the module's tests are done."""
    pytest.importorskip("submitit", reason="the submitit executor needs submitit (pip install 'svdbench[slurm]')")
    try:
        ensure_packages()
    except SlurmUnavailable as exc:
        pytest.skip(f"live SLURM test: {exc}")
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    request.addfinalizer(cluster.stop)
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"live SLURM test: {exc}")
    return cluster


@pytest.fixture(scope="module")
def tiny_llama() -> Path:
    """The trained testbed model (trained and cached on first use, as for the integration tests)."""
    from harness.testbeds.trained import ensure_testbed_model

    return ensure_testbed_model("tiny-llama")


def wait_for(what: str, ready: Callable[[], object], proc: subprocess.Popen, timeout_s: float = 240) -> object:
    """Poll ``ready`` until it returns something truthy; fail if the sweep exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not (value := ready()):
        assert proc.poll() is None, f"the sweep exited (code {proc.returncode}) while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return value


def run_cli(args: list[str], env: dict[str, str], what: str) -> subprocess.CompletedProcess:
    """``python -m harness.cli ARGS`` to the end; its sweep log lines go to this test's log."""
    log.info("$ python -m harness.cli %s  # %s", " ".join(args), what)
    proc = subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    log_sweep_lines(proc.stderr)
    log.info("%s", proc.stdout.strip())
    return proc


def log_sweep_lines(stderr: str) -> None:
    for line in stderr.splitlines():
        if "harness.sweep" in line:  # the executor's submissions and job states, not progress bars
            log.info("  | %s", line.split("\r")[-1])


def status(spec: Path, capsys: pytest.CaptureFixture[str]) -> str:
    """``svdbench sweep SPEC --status`` output (logged)."""
    assert main(["sweep", str(spec), "--status"]) == 0
    text = capsys.readouterr().out
    log.info("$ svdbench sweep %s --status\n%s", spec.name, text.rstrip())
    return text


def row(text: str, cell: Cell) -> list[str]:
    return next(line.split(maxsplit=7) for line in text.splitlines() if cell.key in line)


def comparable(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k not in RUN_SPECIFIC}


@pytest.fixture
def spec_path(tmp_path: Path, tiny_llama: Path) -> Iterator[Path]:
    """The sweep spec, and a private cache that reuses the trained testbed model (the run keys
    hash its path, which must be one for both runs) but starts without statistics."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "testbeds").symlink_to(tiny_llama.parent, target_is_directory=True)
    calib = tmp_path / "calib.txt"
    calib.write_text((DATA / "wikitext-2-v1" / "valid.txt").read_text(encoding="utf-8")[:40_000], encoding="utf-8")
    path = tmp_path / "slurm-live.yaml"
    path.write_text(yaml.safe_dump({"sweep": {
        "name": "slurm-live",
        "results": str(tmp_path / "results"),
        "grid": {"models": [{"reference": "tiny-llama"}], "methods": ["svd", "svd-llm"], "ratios": [0.3, 0.6]},
        "calibration": {"source": f"file:{calib}", "samples": 8, "seqlen": 64},
        "eval": {"seqlen": 128, "max_windows": 4},
        "device": "cpu",
        "executor": "submitit",
        "submitit": {"cluster": "slurm", "gpus_per_node": 0, "cpus_per_task": 1, "mem_gb": 2, "timeout_min": 15,
                     "array_parallelism": 2},
    }}, sort_keys=False), encoding="utf-8")
    yield path


def test_sweep_on_a_live_one_node_slurm(slurm: LocalSlurm, spec_path: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    t0 = time.monotonic()
    cache, results, inprocess = tmp_path / "cache", tmp_path / "results", tmp_path / "results-inprocess"
    # Jobs inherit the submitter's environment (sbatch --export=ALL): this checkout first on the
    # path, the private cache, one thread (as in the in-process run, so that results match bitwise).
    env = {**slurm.env, "PYTHONPATH": str(ROOT), "SVDBENCH_CACHE": str(cache), "SVDBENCH_DATA": str(DATA),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    env.pop(DELAY_ENV, None)
    for name in ("SLURM_CONF", "SVDBENCH_CACHE", "PYTHONPATH"):  # for the --status calls in this process
        monkeypatch.setenv(name, env[name])
    log.info("sweep spec %s:\n%s", spec_path, spec_path.read_text().rstrip())

    # 1. The reference: the same spec in-process; then its statistics are put aside so the SLURM
    #    run computes its own.
    ref = run_cli(["sweep", str(spec_path), "--executor", "inprocess", f"results={inprocess}"], env, "in-process")
    assert ref.returncode == 0, ref.stderr[-3000:]
    (cache / "stats").rename(cache / "stats-inprocess")

    # 2. The SLURM run, every compressed cell slowed down so that signals land mid-cell.
    cells = {(c.method, c.ratio): c for c in plan_cells(load_spec(spec_path))}
    preempted, cancelled = cells[("svd", 0.6)], cells[("svd-llm", 0.6)]
    command = [sys.executable, "-m", "harness.cli", "sweep", str(spec_path)]
    log.info("$ %s=%d python -m harness.cli sweep %s  # the SLURM run", DELAY_ENV, CELL_DELAY_S, spec_path.name)
    first_log = tmp_path / "first-run.log"
    with first_log.open("w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, env={**env, DELAY_ENV: str(CELL_DELAY_S)}, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        jobs = wait_for("the submission manifest", lambda: len(latest_jobs(results)) == len(cells) and
                        latest_jobs(results), proc)
        for c in cells.values():
            log.info("array task %s runs %s (cell %s)", jobs[c.key].job_id, c.describe(), c.key)

        # Preemption: USR2 is what SLURM sends before a timeout or on preemption; submitit then
        # checkpoints the task and requeues it. A requeued job waits ~2 min (SLURM's requeue delay)
        # unless told to start now.
        job = jobs[preempted.key].job_id
        wait_for(f"{preempted.describe()} to start", lambda: read_marker(results, preempted.key), proc)
        slurm.signal(job, "USR2")
        wait_for(f"job {job} to be requeued", lambda: slurm.state(job).startswith("PENDING"), proc)
        log.info("job %s requeued: %s", job, slurm.state(job))
        slurm.sh("scontrol", "update", f"JobId={job}", "StartTime=now")

        # Cancellation, mid-cell.
        job = jobs[cancelled.key].job_id
        wait_for(f"{cancelled.describe()} to start", lambda: read_marker(results, cancelled.key), proc)
        during = status(spec_path, capsys)
        assert row(during, cancelled)[0] == "running"
        slurm.sh("scancel", job)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = first_log.read_text()
    log_sweep_lines(text)
    assert proc.returncode == 1, text[-3000:]  # the sweep is incomplete
    assert text.rstrip().splitlines()[-1] == (
        "sweep slurm-live: 5 cell(s): 0 already done, 5 run (4 ok, 0 failed), "
        "1 cancelled (no record; rerun the sweep to compute them)"
    )

    # Four records; the cancelled cell has none, and --status shows it pending with its job's fate.
    done = records(results)
    assert set(done) == {c.key for c in cells.values()} - {cancelled.key}
    assert all(json.loads(p.read_text())["status"] == "ok" for p in done.values())
    after = status(spec_path, capsys)
    assert after.splitlines()[-1] == "4 done, 0 running, 1 pending, 0 failed"
    assert row(after, cancelled)[0] == "pending" and f"job {jobs[cancelled.key].job_id} CANCELLED" in after

    # The requeued task ran its cell once, from the cached statistics, after submitit's requeue.
    rec = json.loads(done[preempted.key].read_text())
    assert rec["statistics_cached"] is True
    task_log = Path(jobs[preempted.key].stderr).read_text()
    assert "Caught signal SIGUSR2" in task_log and f"Requeued job {jobs[preempted.key].job_id}" in task_log
    assert task_log.count("cell 1/1: ") == 2 and task_log.count("Exiting after successful completion") == 1
    log.info("requeued task's log (%s):\n%s", jobs[preempted.key].stderr, "\n".join(
        line for line in task_log.splitlines() if line[:2] == "20" and any(
            word in line for word in ("submitit", "cell 1/1", "statistics loaded"))))

    # 3. The rerun submits exactly the missing cell and leaves the four records alone.
    before = {key: (p.stat().st_mtime_ns, p.read_bytes()) for key, p in done.items()}
    rerun = run_cli(["sweep", str(spec_path)], env, "the rerun")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.strip() == "sweep slurm-live: 5 cell(s): 4 already done, 1 run (1 ok, 0 failed)"
    jobs_after = latest_jobs(results)
    assert jobs_after[cancelled.key].job_id != jobs[cancelled.key].job_id
    assert {k: j.job_id for k, j in jobs_after.items() if k != cancelled.key} == {
        k: j.job_id for k, j in jobs.items() if k != cancelled.key}  # nothing else was submitted
    log.info("cancelled job %s -> completed by job %s on rerun", jobs[cancelled.key].job_id,
             jobs_after[cancelled.key].job_id)
    final = records(results)
    assert set(final) == {c.key for c in cells.values()}
    assert {p.name for p in results.iterdir() if not p.name.startswith(".")} == {f"{k}.json" for k in final}
    for key, (mtime, content) in before.items():
        assert final[key].stat().st_mtime_ns == mtime and final[key].read_bytes() == content
    assert status(spec_path, capsys).splitlines()[-1] == "5 done, 0 running, 0 pending, 0 failed"

    # 4. Every record equals the in-process run's, but for wall times, memory and cache hits.
    reference = records(inprocess)
    assert set(reference) == set(final)
    for c in cells.values():
        got, want = json.loads(final[c.key].read_text()), json.loads(reference[c.key].read_text())
        assert comparable(got) == comparable(want), c.describe()
        log.info("record %s %-7s %-4s ppl %.6f (in-process %.6f) achieved ratio %.4f statistics cached %-5s job %s",
                 c.key, c.method, "-" if c.is_dense else f"{c.ratio:g}", got["metrics"]["wikitext2"]["ppl"],
                 want["metrics"]["wikitext2"]["ppl"], got["achieved_ratio"], got.get("statistics_cached", "-"),
                 jobs_after[c.key].job_id)
    log.info("live SLURM sweep test: %.0f s", time.monotonic() - t0)
