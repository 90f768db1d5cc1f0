"""Which scheduler job runs which cell: one small manifest per submission, beside the records.

``<results>/.sweep/submissions/<time>-<job>.json`` maps each submitted cell's run key to its job
id, the number of cells that job runs and its stderr log, so ``svdbench sweep SPEC --status`` can
ask the scheduler about a sweep that another process (or another login) submitted. The directory
is hidden, so the report store, which skips hidden paths, never reads a manifest as a record.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.records import write_json_atomic

__all__ = ["SubmittedJob", "latest_jobs", "record_submission", "submissions_dir"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SubmittedJob:
    """One scheduler job of a submission.

    Attributes:
        job_id: The scheduler's id (SLURM: ``"123_4"`` for task 4 of array 123).
        cluster: submitit's cluster name (``slurm``, ``local``, ``debug``).
        cells: How many cells the job runs (1 with ``unit: cell``).
        stderr: Path of the job's stderr log.
        submitted: Submission time (seconds since the epoch).
        folder: submitit's folder (``%j`` unexpanded), to follow the job from another process.
    """

    job_id: str
    cluster: str
    cells: int
    stderr: str
    submitted: float
    folder: str = ""


def submissions_dir(results: str | Path) -> Path:
    return Path(results) / ".sweep" / "submissions"


def record_submission(results: str | Path, jobs: Mapping[str, SubmittedJob]) -> Path:
    """Write the manifest of one submission (run key -> job) and return its path."""
    first = next(iter(jobs.values()))
    stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(first.submitted))
    path = submissions_dir(results) / f"{stamp}-{first.job_id.split('_')[0]}.json"
    write_json_atomic(path, {key: asdict(job) for key, job in jobs.items()})
    return path


def latest_jobs(results: str | Path) -> dict[str, SubmittedJob]:
    """Run key -> the most recently submitted job for that cell, over every manifest in ``results``."""
    out: dict[str, SubmittedJob] = {}
    folder = submissions_dir(results)
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
            jobs = {key: SubmittedJob(**value) for key, value in entries.items()}
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable submission manifest %s (%s)", path, exc)
            continue
        for key, job in jobs.items():
            if key not in out or job.submitted >= out[key].submitted:
                out[key] = job
    return out
