"""``svdbench sweep SPEC --status``: each cell as pending, running, done or failed.

The records decide ``done`` and ``failed``. For the other cells, a live running marker (written by
every executor's worker, see :mod:`harness.sweep.markers`) or the scheduler's state of the cell's
SLURM job (from the submission manifests, see :mod:`harness.sweep.submissions`) decides between
``running`` and ``pending``; a SLURM job that ended in failure without writing a record (killed for
memory, node failure) shows as ``failed`` with its log's first error line. A cancelled (or
preempted) job's cell is ``pending``: it has no record, so the next run of the sweep computes it.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.records import read_record
from harness.sweep.markers import marker_alive, read_marker
from harness.sweep.plan import Cell, cell_problems, plan_cells
from harness.sweep.slurm import (
    CANCELLED,
    PENDING,
    PREEMPTED,
    RUNNING,
    JobState,
    SchedulerUnreachableError,
    job_states,
)
from harness.sweep.spec import SweepSpec
from harness.sweep.submissions import SubmittedJob, latest_jobs

__all__ = ["CellState", "cell_states", "first_error_line", "format_status", "status_report"]

log = logging.getLogger(__name__)

PENDING_, RUNNING_, DONE_, FAILED_ = "pending", "running", "done", "failed"
STATES = (PENDING_, RUNNING_, DONE_, FAILED_)

_TRACEBACK = "Traceback (most recent call last)"
_ERROR_WORD = re.compile(r"\b(error|exception|killed|cancelled|oom)\b", re.IGNORECASE)
_LOG_TAIL_BYTES = 256 << 10


@dataclass(frozen=True)
class CellState:
    """A cell's status with its job id (where one is known) and a one-line detail."""

    status: str
    job: str = ""
    detail: str = ""


def _exception_line(lines: Sequence[str]) -> str | None:
    """The exception line of the first Python traceback in ``lines`` (the root cause of a chain)."""
    inside = False
    for line in lines:
        if line.startswith(_TRACEBACK):
            inside = True
        elif inside and line.strip() and not line.startswith((" ", "\t")):
            return line.strip()
    return None


def first_error_line(text: str | None) -> str:
    """One line that says what went wrong: for a Python traceback its exception line (``RuntimeError:
    boom``), else the text's first non-empty line."""
    lines = (text or "").splitlines()
    first = next((line.strip() for line in lines if line.strip()), "")
    if first.startswith(_TRACEBACK):
        return _exception_line(lines) or first
    return first


def log_error_line(text: str) -> str:
    """The first error of a job's log: a traceback's exception line, else the first line that
    mentions an error (``slurmstepd: error: ... CANCELLED ...``), else ''."""
    lines = text.splitlines()
    if (line := _exception_line(lines)) is not None:
        return line
    return next((line.strip() for line in lines if _ERROR_WORD.search(line)), "")


def _read_log(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            fh.seek(max(0, size - _LOG_TAIL_BYTES))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _from_scheduler(job: SubmittedJob, state: JobState | None) -> CellState:
    """A cell without a record nor a live marker, from its latest SLURM job's state."""
    if state is None:
        return CellState(PENDING_, job.job_id, f"job {job.job_id} unknown to squeue and sacct here")
    described = state.describe(job.job_id)
    if state.state in PENDING:
        return CellState(PENDING_, job.job_id, described)
    if state.state in RUNNING:
        if job.cells == 1:
            return CellState(RUNNING_, job.job_id, described)
        return CellState(PENDING_, job.job_id, f"{described}, on another cell of its group")
    if state.state in (CANCELLED, PREEMPTED, "COMPLETED"):
        # No record: a rerun of the sweep computes it.
        return CellState(PENDING_, job.job_id, f"{described}; not run yet")
    error = log_error_line(_read_log(job.stderr))
    return CellState(FAILED_, job.job_id, f"{described}" + (f": {error}" if error else "") + " (no record)")


def cell_states(cells: Sequence[Cell], results: str | Path) -> dict[str, CellState]:
    """Run key -> :class:`CellState` of every cell, from records, markers and the scheduler."""
    jobs = latest_jobs(results)
    markers = {c.key: m for c in cells if (m := read_marker(results, c.key)) is not None}
    ask = {jobs[c.key].job_id for c in cells if c.key in jobs and jobs[c.key].cluster == "slurm"}
    ask |= {m.slurm_job for m in markers.values() if m.slurm_job}
    try:
        slurm, unreachable = job_states(ask), ""
    except SchedulerUnreachableError as exc:
        slurm, unreachable = {}, str(exc)
    out: dict[str, CellState] = {}
    for cell in cells:
        job = jobs.get(cell.key)
        job_id = job.job_id if job is not None else ""
        try:
            rec = read_record(cell.path, repair=False)  # a status view changes nothing
        except (OSError, json.JSONDecodeError) as exc:
            log.warning("unreadable record %s (%s); treating the cell as not done", cell.path, exc)
            rec = None
        problems = cell_problems(cell, rec) if rec is not None and rec.get("status") == "ok" else []
        if problems:
            log.error("tampered record %s: %s", cell.path, "; ".join(problems))
            rec = None
        if rec is not None:
            if rec.get("status") == "ok":
                out[cell.key] = CellState(DONE_, job_id)
            else:
                out[cell.key] = CellState(FAILED_, job_id, first_error_line(rec.get("error")))
            continue
        marker = markers.get(cell.key)
        alive = marker_alive(marker, slurm) if marker is not None else False
        if marker is not None and alive is not False:
            if marker.slurm_job and marker.slurm_job in slurm:
                where = slurm[marker.slurm_job].describe(marker.slurm_job)
            else:
                where = f"job {marker.slurm_job}" if marker.slurm_job else f"pid {marker.pid}"
            unsure = "" if alive else " (cannot check from this host)"
            out[cell.key] = CellState(RUNNING_, marker.slurm_job or job_id, f"{where} on {marker.host}{unsure}")
        elif job is not None and job.cluster == "slurm" and unreachable:
            out[cell.key] = CellState(PENDING_, job_id, f"job {job_id}: scheduler unreachable ({unreachable})")
        elif job is not None and job.cluster == "slurm":
            out[cell.key] = _from_scheduler(job, slurm.get(job.job_id))
        else:
            out[cell.key] = CellState(PENDING_, job_id, f"tampered record {cell.path.name}: {problems[0]}; the next run "
                                      "recomputes it" if problems else "")
    return out


def format_status(spec: SweepSpec, cells: Sequence[Cell], states: Mapping[str, CellState]) -> str:
    """The status table: one line per cell (status, run key, model, method, ratio, seed, job,
    detail), then the count of each status."""
    results = Path(spec.results).expanduser().resolve()
    width = max([len(c.model) for c in cells] + [5])
    mwidth = max([len(c.method) for c in cells] + [6])
    jwidth = max([len(s.job) for s in states.values()] + [3])
    lines = [f"sweep {spec.name}: {len(cells)} cell(s); results in {results}",
             f"{'status':<8} {'run key':<20} {'model':<{width}} {'method':<{mwidth}} {'ratio':>5} seed "
             f"{'job':<{jwidth}} detail"]
    for c in cells:
        s = states[c.key]
        ratio = "-" if c.is_dense else f"{c.ratio:g}"
        seed = "-" if c.is_dense else str(c.seed)
        lines.append(f"{s.status:<8} {c.key:<20} {c.model:<{width}} {c.method:<{mwidth}} {ratio:>5} {seed:>4} "
                     f"{s.job or '-':<{jwidth}} {s.detail}".rstrip())
    counts = {name: sum(states[c.key].status == name for c in cells) for name in STATES}
    lines.append(", ".join(f"{counts[name]} {name}" for name in (DONE_, RUNNING_, PENDING_, FAILED_)))
    return "\n".join(lines) + "\n"


def status_report(spec: SweepSpec) -> str:
    """The ``--status`` table of ``spec``; plans from run keys alone (no weights, no training)."""
    cells = plan_cells(spec, build_testbeds=False)
    return format_status(spec, cells, cell_states(cells, Path(spec.results).expanduser().resolve()))
