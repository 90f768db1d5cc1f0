"""A sweep killed with SIGKILL in the middle of a cell resumes: every cell ends up done exactly once,
the cells finished before the kill are not recomputed, and no truncated record is left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.cli import main
from harness.sweep.plan import plan_cells
from harness.sweep.spec import load_spec
from harness.sweep.worker import DELAY_ENV
from tests.sweep.conftest import ROOT, records, small_spec, subprocess_env

pytestmark = pytest.mark.integration


def test_sigkill_mid_cell_then_resume(tiny_model, tmp_path, write_spec, monkeypatch, capsys):
    results, cache = tmp_path / "results", tmp_path / "cache"
    spec_path = write_spec(small_spec(tiny_model, results))
    command = [sys.executable, "-m", "harness.cli", "sweep", str(spec_path)]
    log = (tmp_path / "first.log").open("w")
    # Each compressed cell sleeps 2 s before computing, so once dense + one cell are recorded the
    # next cell is certainly in flight when the kill lands.
    proc = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(cache, **{DELAY_ENV: "2"}),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while len(records(results)) < 2:
            assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the sweep did not record two cells in time"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    before = {key: (p.stat().st_mtime_ns, p.read_bytes()) for key, p in records(results).items()}
    assert len(before) == 2

    # The dry run sees the two finished cells and the three missing ones.
    monkeypatch.setenv("SVDBENCH_CACHE", str(cache))
    assert main(["sweep", str(spec_path), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "2 done, 0 failed, 3 missing"

    rerun = subprocess.run(command, cwd=ROOT, env=subprocess_env(cache), capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.strip() == "sweep test: 5 cell(s): 2 already done, 3 run (3 ok, 0 failed)"

    planned = {c.key: c for c in plan_cells(load_spec(spec_path))}
    done = records(results)
    assert set(done) == set(planned)  # every cell exactly once, nothing stray
    assert {p.name for p in results.iterdir() if not p.name.startswith(".")} == {f"{k}.json" for k in planned}
    cells = set()
    for key, path in done.items():
        rec = json.loads(path.read_text())  # valid, complete JSON
        assert rec["status"] == "ok" and rec["run_key"] == key
        cells.add((rec["method"]["name"], rec["ratio"]))
        if key not in before and rec["method"]["name"] != "dense":
            # statistics computed by the killed process came back from the disk cache
            assert rec["statistics_cached"] is True
    assert cells == {("dense", 0.0), ("svd", 0.3), ("svd", 0.6), ("svd-llm", 0.3), ("svd-llm", 0.6)}
    for key, (mtime, content) in before.items():
        assert done[key].stat().st_mtime_ns == mtime and done[key].read_bytes() == content
