"""Outputs are checked before the model loads (harness/runs/preflight.py), and what is computed is
never lost: a results path that is a file (or lies under one), a read-only or full folder fail
first, naming the folder; an export that fails keeps the cell's metrics; a record that cannot be
written is kept elsewhere. The smaller messages: a non-UTF-8 calibration file, a model folder
without weights, a ratio the method cannot reach."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import harness.engine.models
import harness.integrity
import harness.runs.loop
from harness.runs import RunConfig, run
from harness.runs.preflight import OutputError, check_writable, preflight_outputs
from tests.utils import CALIB

pytestmark = pytest.mark.integration


def _config(model: Path, results: Path, **kw) -> RunConfig:
    settings = dict(methods=("svd",), ratios=(0.4,), calib=CALIB, calib_samples=8, calib_seqlen=32, eval_seqlen=64,
                    eval_max_windows=2)
    return RunConfig(model=str(model), results=str(results), **{**settings, **kw})


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if any model weights load."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the preflight refused the run")

    monkeypatch.setattr(harness.engine.models, "load_model", refuse)
    monkeypatch.setattr(harness.runs.session, "load_model", refuse)


def test_a_results_path_that_is_a_file_fails_before_the_model_loads(tiny_llama, tmp_path, monkeypatch, no_load):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    (tmp_path / "taken").write_text("not a folder")
    with pytest.raises(OutputError, match=r"results folder .*taken is a file, not a folder"):
        run(_config(tiny_llama, tmp_path / "taken"))
    with pytest.raises(OutputError, match=r"results folder .*taken/res cannot be created: .*taken is a file"):
        run(_config(tiny_llama, tmp_path / "taken" / "res"))
    with pytest.raises(OutputError, match=r"export folder .*taken is a file"):
        run(_config(tiny_llama, tmp_path / "res", export=str(tmp_path / "taken")))
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "taken" / "cache"))
    with pytest.raises(OutputError, match=r"statistics cache"):
        run(_config(tiny_llama, tmp_path / "res"))


def test_a_read_only_results_folder_fails_before_the_model_loads(tiny_llama, tmp_path, monkeypatch, no_load):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        try:
            (folder / "probe").touch()
            (folder / "probe").unlink()
            writable = True
        except OSError:
            writable = False
        if writable:  # root ignores modes: a read-only bind mount is the other way to get one
            source = tmp_path / "src"
            source.mkdir()
            mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(source), str(folder)], capture_output=True)
            if mounted.returncode != 0:
                pytest.skip("running as root (modes do not stop writes) and read-only bind mounts are not allowed "
                            f"here: {mounted.stderr.decode().strip()}")
            remount = subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True)
            if remount.returncode != 0:
                subprocess.run(["umount", str(folder)])
                pytest.skip(f"cannot make a bind mount read-only here: {remount.stderr.decode().strip()}")
        try:
            with pytest.raises(OutputError, match=r"results folder .*ro is not writable"):
                run(_config(tiny_llama, folder))
        finally:
            if writable:
                subprocess.run(["umount", str(folder)])
    finally:
        folder.chmod(0o755)


def test_a_full_cache_fails_before_the_model_loads(tiny_llama, tmp_path, monkeypatch, no_load):
    """Simulated (disk_usage reporting a full disk), then, where root may mount one, on a real full tmpfs."""
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    real = shutil.disk_usage
    cache = tmp_path / "cache"
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000) if cache in Path(p).parents else real(p))
    with pytest.raises(OutputError, match=r"statistics cache .*has 0.0 MB free, but this run needs about"):
        run(_config(tiny_llama, tmp_path / "res"))
    monkeypatch.setenv("SVDBENCH_PREFLIGHT_SPACE", "0")
    preflight_outputs(_config(tiny_llama, tmp_path / "res"), [("svd", 0.4)])  # the room check can be skipped
    monkeypatch.undo()

    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root in a mount namespace): {done.stderr.decode().strip()}")
    try:
        (mount / "filler").write_bytes(b"\0" * 60_000)
        monkeypatch.setattr(harness.runs.session, "load_model", lambda *a, **k: pytest.fail("loaded"))
        monkeypatch.setenv("SVDBENCH_CACHE", str(mount))
        with pytest.raises(OutputError, match=r"statistics cache"):
            run(_config(tiny_llama, tmp_path / "res"))
    finally:
        subprocess.run(["umount", str(mount)])


def test_failures_after_the_compute_keep_the_metrics(tiny_llama, tmp_path, monkeypatch, caplog):
    """An export that fails keeps the record ok with its metrics; a record the results folder refuses
    at the end is kept in the cache and its metrics logged; a ratio the method cannot reach is warned."""
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))

    def broken_export(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(harness.runs.loop, "export_cell", broken_export)
    cfg = _config(tiny_llama, tmp_path / "res", export=str(tmp_path / "exports"), ratios=(0.999,))
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match=r"1 export\(s\) failed; the cells' metrics"):
        run(cfg)
    (cell,) = [json.loads(p.read_text()) for p in (tmp_path / "res").glob("*.json")
               if json.loads(p.read_text())["method"]["name"] == "svd"]
    assert cell["status"] == "ok" and cell["metrics"]["wikitext2"]["ppl"] > 0
    assert cell["export"]["status"] == "failed" and "No space left on device" in cell["export"]["error"]
    assert "removed only" in caplog.text and cell["numerics"]["ratio_shortfall"] > 0.001  # 0.999 is out of reach

    real = harness.integrity.write_record

    def full_disk(path, record):
        if record.get("method", {}).get("name") == "svd" and record["status"] == "ok":
            raise OSError(28, "No space left on device")
        return real(path, record)

    monkeypatch.setattr(harness.runs.loop, "write_record", full_disk)
    with pytest.raises(RuntimeError, match="cell"):
        run(_config(tiny_llama, tmp_path / "res2"))
    kept = list((tmp_path / "cache" / "unsaved-records").glob("*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["metrics"]["wikitext2"]["ppl"] > 0
    assert "the computed record is kept in" in caplog.text


def test_smaller_messages_name_the_file(tiny_llama, tmp_path, monkeypatch, no_load):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("Le caf\u00e9 est ouvert.\n".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=rf"calibration file {re.escape(str(latin))} is not UTF-8 text: at byte offset 6 \(b'\\xe9'\)"):
        run(_config(tiny_llama, tmp_path / "res", calib=f"file:{latin}"))
    empty = tmp_path / "no-weights"
    empty.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama / name, empty / name)
    with pytest.raises(FileNotFoundError, match=r"model folder .*no-weights holds no weights") as err:
        run(_config(empty, tmp_path / "res"))
    assert "hub id" not in str(err.value)
    assert check_writable(tmp_path / "a" / "b", "results folder").is_dir()
    assert os.listdir(tmp_path / "a" / "b") == []  # the probe file is gone
