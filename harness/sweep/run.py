"""Running a sweep: plan the cells, skip the finished ones, hand the rest to an executor.

Resuming is the same operation as starting: a cell whose record exists with status ``ok`` (and
verifies, :mod:`harness.integrity`) is never recomputed, so after a crash or a kill ``svdbench sweep
SPEC`` simply does what is left; a tampered record is reported and its cell recomputed. Cells with
a ``failed`` record are reported and skipped unless ``retry_failed`` is set. Two sweeps of one spec
(or of overlapping specs) may run at once: cells and statistics are claimed (:mod:`harness.work_claims`),
so each is computed once, and the summary says which cells this sweep computed and which another
process did meanwhile.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from harness.cache import cache_root
from harness.runs.preflight import check_writable
from harness.sweep.executors import CANCELLED_OUTCOME, Executor, make_executor
from harness.sweep.plan import DONE, FAILED, MISSING, TAMPERED, Cell, cell_status, format_plan, plan_cells
from harness.sweep.spec import SweepSpec
from harness.sweep.worker import OTHER, Outcome

__all__ = ["SweepResult", "dry_run", "run_sweep", "status"]

log = logging.getLogger(__name__)


@dataclass
class SweepResult:
    """What a sweep did.

    Attributes:
        cells: Every planned cell (dense baselines included).
        before: Run key -> status (``done``/``failed``/``missing``) before this run.
        outcomes: One outcome per cell this run executed.
        skipped_failed: Failed cells left alone (no ``retry_failed``).
    """

    cells: list[Cell]
    before: dict[str, str]
    outcomes: list[Outcome] = field(default_factory=list)
    skipped_failed: list[Cell] = field(default_factory=list)

    @property
    def failed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status not in ("ok", CANCELLED_OUTCOME)]

    @property
    def cancelled(self) -> list[Outcome]:
        """Cells whose scheduler job was cancelled before they had a record (the next run computes them)."""
        return [o for o in self.outcomes if o.status == CANCELLED_OUTCOME]

    @property
    def by_others(self) -> list[Outcome]:
        """Cells another process recorded while this sweep ran (it computed them, or this sweep
        waited for them instead of computing them twice)."""
        return [o for o in self.outcomes if o.status == "ok" and o.source == OTHER]

    @property
    def ok(self) -> bool:
        """True when every cell now has an ok record."""
        return not self.failed and not self.cancelled and not self.skipped_failed

    def summary(self) -> str:
        """What this sweep did: cells done before, cells it ran (ok, failed), cells another process did."""
        already = sum(s == DONE for s in self.before.values())
        others = self.by_others
        n_run = len(self.outcomes) - len(others)
        n_ok = n_run - len(self.failed) - len(self.cancelled)
        text = f"{len(self.cells)} cell(s): {already} already done, {n_run} run ({n_ok} ok, {len(self.failed)} failed)"
        if others:
            crashed = sum(o.error is not None for o in others)
            text += f", {len(others)} done by another process meanwhile"
            if crashed:
                text += f" ({crashed} of them failed here first)"
        if self.cancelled:
            text += f", {len(self.cancelled)} cancelled (no record; rerun the sweep to compute them)"
        if self.skipped_failed:
            text += f", {len(self.skipped_failed)} failed before and skipped (use --retry-failed)"
        return text


def dry_run(spec: SweepSpec) -> str:
    """The grid with each cell's status, computed from run keys without loading (or training) any weights."""
    cells = plan_cells(spec, build_testbeds=False)
    return format_plan(spec, cells, {c.key: cell_status(c) for c in cells})


def status(spec: SweepSpec) -> str:
    """Each cell as pending, running, done or failed (``--status``); loads no weights."""
    from harness.sweep.status import status_report

    return status_report(spec)


def run_sweep(spec: SweepSpec, executor: str | Executor | None = None, retry_failed: bool = False) -> SweepResult:
    """Run the cells of ``spec`` that have no ok record yet.

    Args:
        spec: The sweep.
        executor: An executor name (default: the spec's ``executor``) or an :class:`Executor`.
        retry_failed: Also rerun cells whose record says ``failed``.

    Returns:
        What was done; failed cells are in the result (and their records), never raised.

    Raises:
        SpecError / ValueError / FileNotFoundError: when the spec cannot be planned.
        ExecutorUnavailableError: when the executor cannot run here.
    """
    # Build the executor first and check the output folders: either should fail before minutes of planning.
    runner = make_executor(executor or spec.executor, spec) if executor is None or isinstance(executor, str) else executor
    check_writable(Path(spec.results).expanduser(), "results folder")
    check_writable(cache_root(), "cache ($SVDBENCH_CACHE)")
    if spec.compressed_store is not None:
        check_writable(Path(spec.compressed_store).expanduser(), "store of compressions (compressed_store)")
    cells = plan_cells(spec)
    before = {c.key: cell_status(c) for c in cells}
    todo = [c for c in cells if before[c.key] in (MISSING, TAMPERED) or (retry_failed and before[c.key] == FAILED)]
    skipped = [c for c in cells if before[c.key] == FAILED and not retry_failed]
    for cell in skipped:
        log.warning("skipping failed cell %s (%s); rerun with --retry-failed", cell.describe(), cell.path)
    log.info("sweep %s: %d cell(s), %d to run", spec.name, len(cells), len(todo))
    outcomes = runner.run_cells(todo) if todo else []
    result = SweepResult(cells, before, outcomes, skipped)
    for o in result.failed:
        log.error("failed: %s (record %s)", o.cell.describe(), o.cell.path)
    for o in result.cancelled:
        log.warning("cancelled: %s (%s)", o.cell.describe(), o.error)
    log.info("sweep %s: %s", spec.name, result.summary())
    return result
