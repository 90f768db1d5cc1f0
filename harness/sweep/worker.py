"""The unit of work every executor runs: one group of cells that share a model and calibration.

:func:`run_group` loads the model once (one :class:`harness.runner.Session`), computes (or loads
from the disk cache) the dense statistics once, and runs each cell. A failing cell is recorded with
its traceback and the others still run. The function is a plain top-level callable over picklable
arguments, so it runs the same in-process, in a spawned worker or in a submitit job.
"""

from __future__ import annotations

import logging
import os
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.records import SCHEMA_VERSION, git_state, read_record, svdbench_version, write_json_atomic
from harness.sweep.markers import clear_running, mark_running
from harness.sweep.plan import Cell

__all__ = ["DELAY_ENV", "GroupJob", "Outcome", "record_failure", "run_group"]

log = logging.getLogger(__name__)

# Testing hook: seconds to sleep before each compressed cell, so a test can reliably kill a sweep
# while a cell is in flight. Unset (or 0) in real use.
DELAY_ENV = "SVDBENCH_SWEEP_CELL_DELAY_S"


@dataclass(frozen=True)
class Outcome:
    """What happened to one cell: ``status`` is ``ok``, ``failed`` (``error`` holds the traceback) or
    ``cancelled`` (its scheduler job was cancelled before it wrote a record)."""

    cell: Cell
    status: str
    error: str | None = None


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _model_name(model: str) -> str:
    path = Path(model)
    return path.name if path.is_dir() else model.split("/")[-1]


def record_failure(cell: Cell, error: str) -> Outcome:
    """Write a ``failed`` record for ``cell`` (unless an ok record already exists) and return it.

    Used when a failure happens outside the engine's own failure records (model load, statistics,
    a worker or job that died), so ``--retry-failed`` finds every failed cell the same way.
    """
    existing = read_record(cell.path) if cell.path.is_file() else None
    if existing is not None and existing.get("status") == "ok":
        return Outcome(cell, "ok")
    write_json_atomic(cell.path, {
        "schema_version": SCHEMA_VERSION,
        "run_key": cell.key,
        "status": "failed",
        "error": error,
        "model": {"id": cell.run.model, "name": _model_name(cell.run.model)},
        "method": {"name": cell.method, "config": None},
        "ratio": cell.ratio,
        "calibration": None,
        "limit": cell.run.limit,
        "provenance": {"svdbench_version": svdbench_version(), **git_state(), "seed": cell.seed},
    })
    return Outcome(cell, "failed", error)


def run_group(cells: Sequence[Cell]) -> list[Outcome]:
    """Run ``cells`` (one group: equal ``run`` configs) against one loaded model.

    Args:
        cells: The group's cells to run; a dense cell, if present, runs first.

    Returns:
        One :class:`Outcome` per cell, in order (dense first).

    Raises:
        ValueError: when the cells do not share one run config.
    """
    import torch

    from harness.runner import Session, prepare

    if not cells:
        return []
    cfg = cells[0].run
    if any(c.run != cfg for c in cells):
        raise ValueError("run_group: cells of one group must share their run config")
    cells = sorted(cells, key=lambda c: not c.is_dense)  # stable: dense first, the rest in order
    delay = float(os.environ.get(DELAY_ENV) or 0.0)
    log.info("group %s (seed %d): %d cell(s)", cells[0].model, cfg.seed, len(cells))
    try:
        prep = prepare(cfg)
        torch.manual_seed(cfg.seed)
        session = Session(prep)
    except Exception:
        tb = traceback.format_exc()
        log.error("group %s (seed %d) could not start:\n%s", cells[0].model, cfg.seed, tb)
        return [record_failure(c, tb) for c in cells]
    methods = {m.name: m for m in prep.methods}
    outcomes: list[Outcome] = []
    for i, cell in enumerate(cells, 1):
        log.info("cell %d/%d: %s", i, len(cells), cell.describe())
        before = _mtime(cell.path)
        mark_running(cell)  # for --status; removed below however the cell ends
        try:
            if cell.is_dense:
                path = session.run_dense()
            else:
                if i == 1:
                    # No dense cell in this group (its record exists or another group owns it), but
                    # evaluations that compare with the dense model still need their references.
                    session.references()
                if delay:
                    time.sleep(delay)
                path = session.run_cell(methods[cell.method], cell.ratio)
        except Exception:
            tb = traceback.format_exc()
            log.error("cell failed: %s\n%s", cell.describe(), tb)
            if _mtime(cell.path) != before and (read_record(cell.path) or {}).get("status") == "failed":
                outcomes.append(Outcome(cell, "failed", tb))  # the engine wrote its own, fuller record
            else:
                outcomes.append(record_failure(cell, tb))
            continue
        finally:
            clear_running(cell)
        if path.stem != cell.key:  # cannot happen while planner and engine share key_fields()
            log.warning("cell %s was planned as %s but recorded as %s", cell.describe(), cell.key, path.stem)
        outcomes.append(Outcome(cell, "ok"))
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
