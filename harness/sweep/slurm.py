"""What the SLURM scheduler says about a sweep's jobs: one ``squeue`` call (``sacct`` as a fallback).

``squeue --states=all`` also lists jobs that ended less than ``MinJobAge`` ago (300 s by default)
with their final state, and works on clusters without accounting storage, where ``sacct`` fails
("Slurm accounting storage is disabled"). Jobs older than that are asked of ``sacct``; when
neither knows a job, it is simply absent from the answer.

Job ids are SLURM's display ids: ``"123"`` for a plain job, ``"123_4"`` for task 4 of array 123.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["ACTIVE", "CANCELLED", "PENDING", "PREEMPTED", "RUNNING", "JobState", "SchedulerUnreachableError",
           "job_states"]

log = logging.getLogger(__name__)

# Scheduler states by what they mean for a cell. Anything else that is not active is an end state.
PENDING = frozenset({"PENDING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESV_DEL_HOLD", "SUSPENDED",
                     "CONFIGURING", "RESIZING", "SPECIAL_EXIT"})
RUNNING = frozenset({"RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "STOPPED"})
ACTIVE = PENDING | RUNNING
CANCELLED = "CANCELLED"
# A preempted job is requeued (PreemptMode=REQUEUE, or submitit's own requeue) or cancelled: the
# state is shown briefly in the first case and for good in the second.
PREEMPTED = "PREEMPTED"

_TIMEOUT_S = 30


@dataclass(frozen=True)
class JobState:
    """One job's state as SLURM names it (``RUNNING``, ``CANCELLED``, ...) and its reason, if any."""

    state: str
    reason: str = ""

    @property
    def active(self) -> bool:
        """Pending or running: the job may still produce its record."""
        return self.state in ACTIVE

    def describe(self, job_id: str) -> str:
        reason = f" ({self.reason})" if self.reason and self.reason != "None" else ""
        return f"job {job_id} {self.state}{reason}"


class SchedulerUnreachableError(RuntimeError):
    """squeue ran but could not answer (controller down, timeout): job states are unknown, not ended."""


def _run(command: list[str]) -> subprocess.CompletedProcess | None:
    """The finished ``command``, or None when it could not run at all (logged at debug)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.debug("%s: %s", command[0], exc)
        return None


def _parse(text: str) -> dict[str, JobState]:
    states: dict[str, JobState] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) < 2 or not parts[0] or "." in parts[0]:  # job steps (123.batch) are not jobs
            continue
        # sacct writes "CANCELLED by 0"; squeue writes "CANCELLED".
        state = parts[1].split()[0] if parts[1].strip() else "UNKNOWN"
        states[parts[0]] = JobState(state, parts[2] if len(parts) > 2 else "")
    return states


def _squeue_once(arrays: list[str]) -> str | None:
    """squeue's answer for ``arrays``, or None when it refuses because one of them is unknown."""
    proc = _run(["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T|%r", f"--jobs={','.join(arrays)}"])
    if proc is None:
        raise SchedulerUnreachableError("squeue did not run (see the debug log)")
    if proc.returncode == 0:
        return proc.stdout
    if "invalid job id" in proc.stderr.lower():
        return None
    raise SchedulerUnreachableError(f"squeue exited {proc.returncode}: {proc.stderr.strip()}")


def _squeue(arrays: list[str]) -> dict[str, JobState]:
    text = _squeue_once(arrays)
    if text is None:
        # squeue fails as a whole when one listed id is no longer known: ask one array at a time.
        text = "".join(_squeue_once([a]) or "" for a in arrays)
    return _parse(text)


def _sacct(arrays: list[str]) -> dict[str, JobState]:
    proc = _run(["sacct", "--noheader", "--parsable2", "--allocations", "--format=JobID,State,Reason",
                 f"--jobs={','.join(arrays)}"])
    # Clusters without accounting storage answer "Slurm accounting storage is disabled": no states.
    return _parse(proc.stdout) if proc is not None and proc.returncode == 0 else {}


def job_states(job_ids: Iterable[str]) -> dict[str, JobState]:
    """The scheduler's state of each job in ``job_ids`` it still knows (ids it does not are absent).

    Returns an empty mapping where SLURM's commands are not installed.

    Raises:
        SchedulerUnreachableError: when squeue is installed but cannot answer.
    """
    wanted = set(job_ids)
    if not wanted or shutil.which("squeue") is None:
        return {}
    arrays = sorted({j.split("_")[0] for j in wanted})
    states = _squeue(arrays)
    missing = sorted({j.split("_")[0] for j in wanted if j not in states})
    if missing and shutil.which("sacct") is not None:
        states = {**_sacct(missing), **states}
    return {j: s for j, s in states.items() if j in wanted}
