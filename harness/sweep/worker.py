"""The unit of work every executor runs: one group of cells that share a model and calibration.

:func:`run_group` hands the group to the one run loop (:func:`harness.runs.run_cells`): one model
load, the dense statistics computed (or loaded from the disk cache) once, each cell in turn. A failing cell is recorded with
its traceback and the others still run. Cells and statistics are claimed (:mod:`harness.work_claims`), so
workers of several sweeps share one results folder without computing anything twice; each outcome
says whether this worker or another process produced the cell's record. The function is a plain top-level callable over picklable
arguments, so it runs the same in-process, in a spawned worker or in a submitit job.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.integrity import verify_record, write_record
from harness.records import (
    failed_record,
    git_state,
    read_record,
    record_header,
    svdbench_version,
)
from harness.sweep.markers import clear_running, mark_running
from harness.sweep.plan import Cell
from harness.work_claims import Claim, try_claim

__all__ = ["DELAY_ENV", "GroupJob", "Outcome", "record_failure", "run_group"]

log = logging.getLogger(__name__)

# Testing hook: seconds to sleep before each compressed cell, so a test can reliably kill a sweep
# while a cell is in flight. Unset (or 0) in real use.
DELAY_ENV = "SVDBENCH_SWEEP_CELL_DELAY_S"


HERE, OTHER = "here", "other"


@dataclass(frozen=True)
class Outcome:
    """What happened to one cell: ``status`` is ``ok``, ``failed`` (``error`` holds the traceback) or
    ``cancelled`` (its scheduler job was cancelled before it wrote a record); ``source`` is ``here``
    when this process produced the record, ``other`` when another process did (it computed the
    cell while this one waited, or finished it after this one failed)."""

    cell: Cell
    status: str
    error: str | None = None
    source: str = HERE


def _model_name(model: str) -> str:
    path = Path(model)
    return path.name if path.is_dir() else model.split("/")[-1]


def record_failure(cell: Cell, error: str) -> Outcome:
    """Write a ``failed`` record for ``cell`` and return its outcome, unless the cell has an ok record
    that verifies (then the outcome is ``ok`` from another process) or another live process is
    computing it (then nothing is written: that process writes the record).

    Used when a failure happens outside the engine's own failure records (model load, statistics,
    a worker or job that died), so ``--retry-failed`` finds every failed cell the same way. A results
    folder that refuses the record is logged, never raised.
    """
    existing = read_record(cell.path, repair=False) if cell.path.is_file() else None
    if existing is not None and existing.get("status") == "ok" and verify_record(existing, cell.path).ok:
        log.warning("%s failed here, but %s holds its finished record (written by another process)",
                    cell.describe(), cell.path)
        return Outcome(cell, "ok", error, source=OTHER)
    header = record_header(cell.key, {"id": cell.run.model, "name": _model_name(cell.run.model)}, cell.run.limit,
                           {"svdbench_version": svdbench_version(), **git_state(), "seed": cell.seed},
                           {"name": cell.method, "config": None}, cell.ratio, None)
    try:
        claim = try_claim(cell.path, f"failure record of {cell.describe()}")
        if not isinstance(claim, Claim):
            log.warning("%s failed here; not recording it, %s is computing it", cell.describe(), claim.describe())
            return Outcome(cell, "failed", error)
        with claim:
            write_record(cell.path, failed_record(header, error))
    except OSError as exc:
        log.error("could not record the failure of %s in %s: %s", cell.describe(), cell.path, exc)
    return Outcome(cell, "failed", error)


def run_group(cells: Sequence[Cell]) -> list[Outcome]:
    """Run ``cells`` (one group: equal ``run`` configs) against one loaded model, through the one
    run loop :func:`harness.runs.run_cells`.

    Args:
        cells: The group's cells to run; a dense cell, if present, runs first.

    Returns:
        One :class:`Outcome` per cell, in order (dense first).

    Raises:
        ValueError: when the cells do not share one run config.
    """
    from harness.runs import run_cells

    if not cells:
        return []
    cfg = cells[0].run
    if any(c.run != cfg for c in cells):
        raise ValueError("run_group: cells of one group must share their run config")
    cells = sorted(cells, key=lambda c: not c.is_dense)  # stable: dense first, the rest in order
    by_item = {(c.method, c.ratio): c for c in cells}
    delay = float(os.environ.get(DELAY_ENV) or 0.0)

    def before(method: str, ratio: float) -> None:
        cell = by_item[(method, ratio)]
        mark_running(cell)  # for --status; removed in after() however the cell ends
        if delay and not cell.is_dense:
            time.sleep(delay)

    def after(method: str, ratio: float) -> None:
        clear_running(by_item[(method, ratio)])

    log.info("group %s (seed %d): %d cell(s)", cells[0].model, cfg.seed, len(cells))
    outcomes: list[Outcome] = []
    for cell, done in zip(cells, run_cells(cfg, [(c.method, c.ratio) for c in cells], before, after), strict=True):
        if done.status == "ok":
            if done.path is not None and done.path.stem != cell.key:  # cannot happen while planner and engine share key_fields()
                log.warning("cell %s was planned as %s but recorded as %s", cell.describe(), cell.key, done.path.stem)
            # A record found done was finished after the sweep planned it: by another process.
            outcomes.append(Outcome(cell, "ok", done.error, source=HERE if done.source == "here" else OTHER))
            continue
        error = done.error or "failed"
        log.error("cell failed: %s\n%s", cell.describe(), error)
        # The engine writes its own, fuller record when compression or evaluation fails; a failure
        # before that (model load, statistics) is recorded here.
        outcomes.append(Outcome(cell, "failed", error) if done.recorded else record_failure(cell, error))
    return outcomes


class GroupJob:
    """:func:`run_group` as a submitit callable that requeues itself on preemption or timeout.

    Requeueing is safe because finished cells are skipped by their records: the resumed job only
    does what is left. submitit is imported only inside a job, when a checkpoint is requested.
    """

    def __call__(self, cells: Sequence[Cell]) -> list[Outcome]:
        # A job is a fresh interpreter: send progress to its log file (a no-op if already set up).
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        return run_group(cells)

    def checkpoint(self, cells: Sequence[Cell]) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, cells)
