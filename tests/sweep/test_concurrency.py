"""Many processes, one cache and one results folder: four ``svdbench run`` (two on the same cell,
two on one cell each, all four on the shared dense cell and statistics) and two sweeps of one spec
holding those cells, all at once. Nothing crashes, no record fails, each statistic and each cell is computed once (one
``stored statistic`` / ``recorded`` log line among all processes), nothing is left quarantined or
half-written, and the records equal a single-process run's."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from harness.integrity import SIGNED, verify_record
from harness.sweep.run import run_sweep
from harness.sweep.spec import parse_spec
from tests.sweep.conftest import ROOT, records, small_spec, subprocess_env

pytestmark = pytest.mark.integration

# Shorter polls than the default so that a waiting process notices a finished claim quickly.
FAST = {"SVDBENCH_CLAIM_POLL_S": "0.3", "OMP_NUM_THREADS": "1"}  # six processes on few cores: no spinning threads
COMPARED = ("status", "ratio", "method", "metrics", "achieved_ratio", "params_compressed", "layers", "key_fields")


def _run_args(model: Path) -> list[str]:
    """``svdbench run`` flags equal to :func:`small_spec`'s calibration and evaluation (same run keys)."""
    return ["--model", str(model), "--calib", f"file:{model.parent / 'calib.txt'}", "--calib-samples", "8",
            "--calib-seqlen", "64", "--eval-seqlen", "128", "--eval-max-windows", "4"]


def _wait_all(procs: list[subprocess.Popen], logs: list[Path]) -> list[str]:
    """Wait for every process (killing them all if one hangs or the test stops); their logs."""
    try:
        for proc in procs:
            proc.wait(timeout=240)
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    texts = [log.read_text(encoding="utf-8", errors="replace") for log in logs]
    for proc, text in zip(procs, texts, strict=True):
        assert proc.returncode == 0, text[-4000:]
    return texts


def _assert_each_once(texts: list[str], results: Path, tree: Path) -> dict[str, dict]:
    """Every record ok, signed and recorded by exactly one process; the statistic stored once; nothing
    quarantined, staged or claimed left behind; no crash in any log."""
    joined = "\n".join(texts)
    assert "Traceback" not in joined and "SafetensorError" not in joined
    recs = {key: json.loads(path.read_text()) for key, path in records(results).items()}
    for key, rec in recs.items():
        assert rec["status"] == "ok" and verify_record(rec, results / f"{key}.json").status == SIGNED
        writers = [i for i, text in enumerate(texts) if re.search(rf"recorded .*: {re.escape(str(results / key))}\.json", text)]
        assert len(writers) == 1, (key, writers)
    assert joined.count("stored statistic gram ") == 1
    assert not list(tree.rglob("*.corrupt-*"))
    assert not [p for p in tree.rglob("*") if ".tmp" in p.name or p.name.endswith(".claim")]
    return recs


def test_four_runs_and_two_sweeps_on_one_cache_and_one_results_folder(tiny_model: Path, tmp_path: Path, write_spec,
                                                                      monkeypatch) -> None:
    """Six processes at once: ``svdbench run`` twice on one cell, twice on a cell of its own, and two
    sweeps of the spec that holds those cells (the runs' flags give the spec's run keys)."""
    results, cache = tmp_path / "results", tmp_path / "cache"
    spec_path = write_spec(small_spec(tiny_model, results))
    cells = [("svd-llm", "0.3"), ("svd-llm", "0.3"), ("svd", "0.3"), ("svd", "0.6")]
    commands = [["run", *_run_args(tiny_model), "--method", m, "--ratio", r, "--results", str(results)] for m, r in cells]
    commands += [["sweep", str(spec_path)], ["sweep", str(spec_path)]]
    procs, logs, outs = [], [], []
    for i, command in enumerate(commands):
        logs.append(tmp_path / f"proc{i}.log")
        outs.append(tmp_path / f"proc{i}.out")
        with logs[-1].open("w") as err, outs[-1].open("w") as out:
            procs.append(subprocess.Popen([sys.executable, "-m", "harness.cli", *command], cwd=ROOT,
                                          env=subprocess_env(cache, **FAST), stdout=out, stderr=err))
    texts = _wait_all(procs, logs)
    recs = _assert_each_once(texts, results, tmp_path)
    assert sorted((r["method"]["name"], r["ratio"]) for r in recs.values()) == [
        ("dense", 0.0), ("svd", 0.3), ("svd", 0.6), ("svd-llm", 0.3), ("svd-llm", 0.6)]
    for out in outs[-2:]:  # each sweep counts what it ran and what the others did, and nothing failed
        line = out.read_text().strip()
        match = re.fullmatch(r"sweep test: 5 cell\(s\): (\d+) already done, (\d+) run \((\d+) ok, 0 failed\)"
                             r"(?:, (\d+) done by another process meanwhile)?", line)
        assert match, line
        already, ran, ok, other = (int(g or 0) for g in match.groups())
        assert ran == ok and already + ran + other == 5, line

    # The same cells in one process (one thread, as the six had), with a cache of its own: the same records.
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache-single"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = run_sweep(parse_spec(small_spec(tiny_model, tmp_path / "single")))
    finally:
        torch.set_num_threads(threads)
    assert single.ok and len(single.outcomes) == 5
    for key, path in records(tmp_path / "single").items():
        alone = json.loads(path.read_text())
        assert {k: alone.get(k) for k in COMPARED} == {k: recs[key].get(k) for k in COMPARED}, key
