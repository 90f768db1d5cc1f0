"""Running markers: which cell a worker is computing right now, whatever the executor.

A worker writes ``<results>/.sweep/running/<run key>.json`` (host, pid, SLURM job id) when it
starts a cell and removes it when the cell ends, so ``--status`` can tell a running cell from a
pending one without asking the process. A worker killed with SIGKILL leaves its marker behind;
:func:`marker_alive` therefore checks the process (same host) or the job (SLURM) before believing
it. The directory is hidden, so the report store never reads a marker as a record.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.records import write_json_atomic
from harness.sweep.plan import Cell
from harness.sweep.slurm import RUNNING, JobState
from harness.work_claims import pid_alive

__all__ = ["Marker", "clear_running", "mark_running", "marker_alive", "read_marker", "slurm_job_id"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Marker:
    """A running marker: where the cell runs and since when."""

    key: str
    host: str
    pid: int
    started: float
    slurm_job: str | None = None


def _path(results: str | Path, key: str) -> Path:
    return Path(results) / ".sweep" / "running" / f"{key}.json"


def slurm_job_id() -> str | None:
    """This process's SLURM job id as squeue shows it (``123_4`` inside an array), None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def mark_running(cell: Cell) -> None:
    """Record that this process has started ``cell``. Never raises: status is a convenience."""
    marker = Marker(cell.key, socket.gethostname(), os.getpid(), time.time(), slurm_job_id())
    try:
        write_json_atomic(_path(cell.run.results, cell.key), asdict(marker))
    except OSError as exc:
        log.warning("could not write the running marker of %s: %s", cell.describe(), exc)


def clear_running(cell: Cell) -> None:
    """Remove this process's marker of ``cell`` (one written by another process is left alone)."""
    path = _path(cell.run.results, cell.key)
    marker = read_marker(cell.run.results, cell.key)
    if marker is not None and marker.pid == os.getpid() and marker.host == socket.gethostname():
        path.unlink(missing_ok=True)


def read_marker(results: str | Path, key: str) -> Marker | None:
    """The marker of cell ``key``, or None when there is none (or it is unreadable)."""
    try:
        return Marker(**json.loads(_path(results, key).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as exc:
        log.warning("ignoring unreadable running marker of %s (%s)", key, exc)
        return None


def marker_alive(marker: Marker, slurm: Mapping[str, JobState]) -> bool | None:
    """Whether the marker's worker still runs: its SLURM job's state where the scheduler knows the
    job, else its process on this host; None when neither can be checked (another host, no SLURM)."""
    if marker.slurm_job is not None and marker.slurm_job in slurm:
        return slurm[marker.slurm_job].state in RUNNING
    if marker.host == socket.gethostname():
        return pid_alive(marker.pid)
    return None
