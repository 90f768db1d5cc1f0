"""Claims (harness/work_claims.py): one owner at a time, released on exit or garbage collection, and
recovered when the owner died (a dead pid on this host, SIGKILLed while holding it) or went silent
(another host's stale heartbeat). Quarantine and file modes (harness/files.py) are checked here too."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.files import follow_umask, prune_quarantine, quarantine, quarantined, write_text_atomic
from harness.work_claims import Claim, ClaimInfo, claim_path, read_claim, try_claim, wait_for

ROOT = Path(__file__).resolve().parents[2]

# A child that claims its target, says so, then sleeps until killed.
_HOLDER = """
import sys, time
from pathlib import Path
from harness.work_claims import try_claim
claim = try_claim(Path(sys.argv[1]), "held by a child")
print("claimed" if type(claim).__name__ == "Claim" else "refused", flush=True)
time.sleep(600)
"""


def _fake_claim(target: Path, host: str, pid: int, age_s: float = 0.0) -> Path:
    path = claim_path(target)
    path.write_text(json.dumps({"host": host, "pid": pid, "token": "t0k3n", "what": "fake", "created": time.time()}))
    if age_s:
        os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_one_owner_then_released(tmp_path: Path) -> None:
    target = tmp_path / "cell.json"
    first = try_claim(target, "a cell")
    assert isinstance(first, Claim) and claim_path(target).is_file()
    again = try_claim(target, "a cell")  # this process holds it through another object: not taken twice
    assert isinstance(again, ClaimInfo) and again.pid == os.getpid()
    with pytest.raises(RuntimeError, match="claimed by this process already"):
        wait_for(target, lambda: False, "a cell")
    first.release()
    assert not claim_path(target).exists()
    first.release()  # idempotent
    with try_claim(target) as second:
        assert isinstance(second, Claim)
    assert not claim_path(target).exists()
    third = try_claim(target)
    assert isinstance(third, Claim)
    del third
    gc.collect()
    assert not claim_path(target).exists()  # an unreleased claim is released when collected


def test_a_dead_owner_on_this_host_is_recovered(tmp_path: Path) -> None:
    target = tmp_path / "stat"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    _fake_claim(target, os.uname().nodename, gone.pid)
    got = try_claim(target, "recovering")
    assert isinstance(got, Claim)
    assert read_claim(claim_path(target)).token == got.token
    got.release()


def test_another_hosts_claim_is_stale_only_after_its_heartbeat_timeout(tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "stat"
    _fake_claim(target, "some-other-node", 12345, age_s=5)
    held = try_claim(target, stale_after_s=60)
    assert isinstance(held, ClaimInfo) and held.host == "some-other-node"  # alive as far as we can tell
    assert isinstance(try_claim(target, stale_after_s=1), Claim)  # heartbeat older than the limit


def test_wait_for_returns_when_the_work_is_done(tmp_path: Path) -> None:
    target = tmp_path / "stat"
    _fake_claim(target, "some-other-node", 1, age_s=0)
    done = iter([False, False, True])
    assert wait_for(target, lambda: next(done), "stat", poll_s=0.01, max_poll_s=0.01) is None


def test_a_sigkilled_owner_is_recovered_by_a_waiter(tmp_path: Path) -> None:
    target = tmp_path / "cell.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _HOLDER, str(target)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout.readline().strip() == "claimed"
        info = read_claim(claim_path(target))
        assert info is not None and info.pid == child.pid
        assert isinstance(try_claim(target), ClaimInfo)  # alive: refused
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        t0 = time.monotonic()
        got = wait_for(target, lambda: False, "the killed child's cell", poll_s=0.05, max_poll_s=0.1)
        assert isinstance(got, Claim) and time.monotonic() - t0 < 5
        assert read_claim(claim_path(target)).pid == os.getpid()
        got.release()
    finally:
        child.kill()
        child.wait()


def test_quarantine_is_bounded_by_count_and_size(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("SVDBENCH_QUARANTINE_KEEP", "2")
    for i in range(4):
        bad = tmp_path / "gram"
        bad.mkdir()
        (bad / "block-00000.safetensors").write_bytes(b"x" * 100)
        assert quarantine(bad, f"corrupt #{i}") is not None
        time.sleep(0.01)
    kept = quarantined(tmp_path)
    assert len(kept) == 2 and not (tmp_path / "gram").exists()
    assert prune_quarantine(tmp_path, keep=5, max_bytes=150) == [kept[1]]  # the older one is over the size bound
    monkeypatch.setenv("SVDBENCH_QUARANTINE_MAX_GB", "0.0000005")  # 500 bytes
    big = tmp_path / "huge.json"
    big.write_bytes(b"y" * 1000)
    assert quarantine(big, "too big to keep") is None  # alone larger than the bound: removed at once
    assert not any(p.name.startswith("huge.json") for p in tmp_path.iterdir())
    assert quarantined(tmp_path) == [kept[0]]


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_text_atomic(tmp_path / "record.json", "{}")
        (tmp_path / "dir").mkdir()
        (tmp_path / "dir" / "f").write_text("x")
        (tmp_path / "dir" / "f").chmod(0o600)
        follow_umask(tmp_path / "dir")
    finally:
        os.umask(old)
    assert (tmp_path / "record.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "dir" / "f").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "dir").stat().st_mode & 0o777 == 0o750
