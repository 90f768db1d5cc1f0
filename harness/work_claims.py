"""Claims: which process computes a shared piece of work (a statistic, a compression, a cell) now.

Several processes (runs, sweeps, workers, SLURM tasks on several nodes) share one cache and one
results folder. Before computing something another process might compute too, a process *claims*
it: it creates the claim file ``<name>.claim`` beside the work's output, holding the owner's host,
pid, the pid's start time and a random token. Whoever finds a live claim waits for the work (or
takes other work) instead of computing it twice.

* **Creation is atomic on a network filesystem.** The claim is written completely to a temporary
  file, then hard-linked to its name (``link`` fails when the name exists, on NFS too); where a
  filesystem has no hard links, ``O_CREAT | O_EXCL`` creates it.
* **Heartbeat.** While a claim is held, a daemon thread of the owner touches its mtime every
  ``$SVDBENCH_CLAIM_HEARTBEAT_S`` seconds (default 20).
* **Stale claims are recovered.** A claim is stale when its owner is gone: on this host, its pid
  is dead (or was reused: its start time differs); on another host, its heartbeat is older than
  ``$SVDBENCH_CLAIM_STALE_S`` seconds (default 300). A stale claim is broken (removed) under an
  exclusive ``fcntl`` lock of the folder's ``.claims.lock`` after checking, under the lock, that it is
  still the claim judged stale, so two waiters never both take it over; releasing takes the same lock.

Claims only avoid duplicated work: every output is still written through a temporary name and
renamed (first writer wins), so a claim lost to a slow heartbeat costs time, never integrity.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from harness.files import current_umask

__all__ = [
    "HEARTBEAT_ENV", "POLL_ENV", "STALE_ENV", "Claim", "ClaimInfo", "claim_path", "read_claim", "try_claim", "wait_for",
]

log = logging.getLogger(__name__)

HEARTBEAT_ENV = "SVDBENCH_CLAIM_HEARTBEAT_S"
STALE_ENV = "SVDBENCH_CLAIM_STALE_S"
POLL_ENV = "SVDBENCH_CLAIM_POLL_S"  # longest pause between two looks at a claim one waits for
SUFFIX = ".claim"


def heartbeat_s() -> float:
    return float(os.environ.get(HEARTBEAT_ENV) or 20.0)


def stale_s() -> float:
    return float(os.environ.get(STALE_ENV) or 300.0)


def claim_path(target: Path) -> Path:
    """The claim file of ``target`` (hidden, beside it): ``<dir>/.<name>.claim``."""
    return target.with_name(f".{target.name}{SUFFIX}")


def _pid_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (another user's process counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True


@dataclass(frozen=True)
class ClaimInfo:
    """What a claim file says about its owner, and its heartbeat (the file's mtime)."""

    path: Path
    host: str
    pid: int
    token: str
    what: str
    created: float
    heartbeat: float
    pid_start: str | None = None

    def describe(self) -> str:
        return f"{self.host} pid {self.pid}, heartbeat {max(0.0, time.time() - self.heartbeat):.0f} s ago"

    @property
    def mine(self) -> bool:
        """Whether this very process owns the claim (through another :class:`Claim` object)."""
        return self.host == socket.gethostname() and self.pid == os.getpid() and self.pid_start == _pid_start(os.getpid())

    def stale_reason(self, stale_after_s: float | None = None) -> str | None:
        """Why the owner is gone, or None while it may still run."""
        if self.host == socket.gethostname():
            if not pid_alive(self.pid):
                return f"its owner pid {self.pid} on this host is dead"
            start = _pid_start(self.pid)
            if self.pid_start is not None and start is not None and start != self.pid_start:
                return f"its owner pid {self.pid} on this host ended (the pid was reused)"
            return None
        limit = stale_s() if stale_after_s is None else stale_after_s
        age = time.time() - self.heartbeat
        if age > limit:
            return f"its owner {self.host} pid {self.pid} sent no heartbeat for {age:.0f} s (limit {limit:g} s)"
        return None


def read_claim(path: Path) -> ClaimInfo | None:
    """The claim at ``path``; None when there is none. An unreadable claim file (not written by this
    module) counts as a claim of an unknown owner whose heartbeat is the file's mtime."""
    try:
        heartbeat = path.stat().st_mtime
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    try:
        data = json.loads(raw)
        return ClaimInfo(path, str(data["host"]), int(data["pid"]), str(data["token"]), str(data.get("what", "")),
                         float(data.get("created", heartbeat)), heartbeat, data.get("pid_start"))
    except (ValueError, KeyError, TypeError):
        return ClaimInfo(path, "?", -1, f"unreadable:{heartbeat}", "", heartbeat, heartbeat)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive ``fcntl`` lock of the claim's folder (``.claims.lock``), serialising the breaking and
    releasing of its claims (one lock file per folder, not one per claim: they would pile up)."""
    lock = path.with_name(".claims.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~current_umask())
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # POSIX record lock: honoured across NFS clients (lockd)
        yield
    finally:
        os.close(fd)  # closing drops the lock


class _Heartbeats:
    """One daemon thread per process touching every held claim's mtime."""

    def __init__(self) -> None:
        self.claims: weakref.WeakSet[Claim] = weakref.WeakSet()
        self.lock = threading.Lock()
        self.thread: threading.Thread | None = None
        self.pid = os.getpid()

    def add(self, claim: Claim) -> None:
        with self.lock:
            if self.pid != os.getpid():  # a forked child: the parent's thread is not ours
                self.claims, self.thread, self.pid = weakref.WeakSet(), None, os.getpid()
            self.claims.add(claim)
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="svdbench-claims", daemon=True)
                self.thread.start()

    def discard(self, claim: Claim) -> None:
        with self.lock:
            self.claims.discard(claim)

    def _run(self) -> None:
        while True:
            time.sleep(heartbeat_s())
            with self.lock:
                held = list(self.claims)
            for claim in held:
                claim.beat()


_HEARTBEATS = _Heartbeats()


class Claim:
    """A claim this process holds (made by :func:`try_claim`); release it with :meth:`release` or a
    ``with`` block. A claim that is garbage-collected unreleased is released then."""

    def __init__(self, path: Path, token: str, what: str) -> None:
        self.path, self.token, self.what = path, token, what
        self.held = True
        self._finalizer = weakref.finalize(self, _release, path, token)
        _HEARTBEATS.add(self)

    def beat(self) -> None:
        """Touch the claim's mtime if it is still ours (a lost claim is logged once and dropped)."""
        if not self.held:
            return
        info = read_claim(self.path)
        if info is None or info.token != self.token:
            log.warning("claim %s (%s) was taken over by another process; finishing anyway (the first "
                        "output renamed into place wins)", self.path, self.what)
            self.held = False
            _HEARTBEATS.discard(self)
            return
        with contextlib.suppress(OSError):
            os.utime(self.path)

    def release(self) -> None:
        """Remove the claim if it is still ours; idempotent."""
        if self.held:
            self.held = False
            _HEARTBEATS.discard(self)
        self._finalizer()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Claim({self.path}, {'held' if self.held else 'released'})"


def _release(path: Path, token: str) -> None:
    try:
        with _locked(path):
            info = read_claim(path)
            if info is not None and info.token == token:
                path.unlink(missing_ok=True)
    except OSError as exc:  # a vanished folder or a read-only one: nothing left to release
        log.debug("releasing %s: %s", path, exc)


def _create(path: Path, body: str) -> bool:
    """Create ``path`` with ``body`` unless it exists; False when it does."""
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~current_umask())
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(body)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
        try:  # no hard links here: exclusive creation (atomic on local filesystems and NFSv3+)
            fd2 = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 & ~current_umask())
        except FileExistsError:
            return False
        with os.fdopen(fd2, "w", encoding="utf-8") as fh:
            fh.write(body)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _break_if_stale(info: ClaimInfo, stale_after_s: float | None) -> bool:
    """Remove the claim ``info`` if, under the lock, it is still that claim and still stale."""
    with _locked(info.path):
        now = read_claim(info.path)
        if now is None:
            return True
        if now.token != info.token:
            return False  # taken over meanwhile by someone else
        reason = now.stale_reason(stale_after_s)
        if reason is None:
            return False
        info.path.unlink(missing_ok=True)
    log.warning("recovered the stale claim %s (%s): %s", info.path, info.what or "unnamed work", reason)
    return True


def try_claim(target: Path, what: str = "", stale_after_s: float | None = None) -> Claim | ClaimInfo:
    """Claim ``target`` (its claim file :func:`claim_path`) without waiting.

    Args:
        target: The work's output (a record, a statistic's folder, a stored compression).
        what: A description for logs and for whoever finds the claim.
        stale_after_s: Heartbeat age after which another host's claim counts as stale (default
            ``$SVDBENCH_CLAIM_STALE_S``).

    Returns:
        The :class:`Claim`, or the :class:`ClaimInfo` of the live claim another owner holds.

    Raises:
        OSError: when the claim file cannot be created (a read-only folder).
    """
    path = claim_path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    body = json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                       "token": token, "what": what, "created": time.time()})
    for _ in range(5):  # each round either creates, finds a live owner, or removes a stale claim
        if _create(path, body):
            return Claim(path, token, what)
        info = read_claim(path)
        if info is None:
            continue  # released between our create and our read
        if info.mine:
            return info  # this process holds it already (another object of ours): not ours to take twice
        if info.stale_reason(stale_after_s) is None or not _break_if_stale(info, stale_after_s):
            return info
    info = read_claim(path)
    if info is None:
        raise OSError(f"could not claim {target}: its claim file {path} keeps changing")
    return info


def wait_for(target: Path, done: Callable[[], bool], what: str = "", poll_s: float = 0.1,
             max_poll_s: float | None = None, stale_after_s: float | None = None,
             log_every_s: float = 60.0) -> Claim | None:
    """Wait until ``done()`` or until this process holds the claim of ``target``.

    Looks again after ``poll_s`` seconds, then less and less often, at most every ``max_poll_s``
    seconds (default ``$SVDBENCH_CLAIM_POLL_S``, else 2).

    Returns:
        None when the work is done (by whoever), else the held :class:`Claim` (the caller computes
        the work, then releases it). ``done()`` is checked again after claiming, so a claim is only
        returned for work that is still not done.
    """
    if max_poll_s is None:
        max_poll_s = float(os.environ.get(POLL_ENV) or 2.0)
    waited, last_log, delay = 0.0, 0.0, poll_s
    while True:
        if done():
            return None
        got = try_claim(target, what, stale_after_s)
        if isinstance(got, Claim):
            if done():
                got.release()
                return None
            return got
        if got.mine:
            raise RuntimeError(f"{what or target} is claimed by this process already ({got.path}); waiting would never end")
        if waited - last_log >= log_every_s or last_log == 0.0:
            log.info("waiting for %s: being computed by %s", what or target, got.describe())
            last_log = waited or 1e-9
        time.sleep(delay)
        waited += delay
        delay = min(max_poll_s, delay * 1.5)

