"""Executors: where the groups of a sweep run.

Every executor takes cells, splits them into groups (one model load and one statistics pass each,
see :func:`harness.sweep.plan.group_cells`) and runs :func:`harness.sweep.worker.run_group` on each.
Cells share nothing but the result store and the on-disk statistics cache, so any executor can
resume a sweep started by any other.

* ``inprocess`` (default): the groups one after another in this process.
* ``local-gpus``: one spawned worker per local GPU, pinned with ``CUDA_VISIBLE_DEVICES``, each
  taking groups from a shared queue.
* ``submitit``: one SLURM job array (``AutoExecutor.map_array``) with one task per cell (or per
  group), or local processes with ``cluster: local``. Needs the optional extra ``svdbench[slurm]``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from harness.sweep.plan import DONE, Cell, cell_status, group_cells
from harness.sweep.slurm import CANCELLED, PREEMPTED, JobState, SchedulerUnreachableError, job_states
from harness.sweep.spec import SubmititSpec, SweepSpec
from harness.sweep.submissions import SubmittedJob, latest_jobs, record_submission
from harness.sweep.worker import GroupJob, Outcome, record_failure, run_group

__all__ = [
    "CANCELLED_OUTCOME",
    "Executor",
    "ExecutorUnavailableError",
    "InProcessExecutor",
    "LocalGpusExecutor",
    "SubmititExecutor",
    "make_executor",
]

log = logging.getLogger(__name__)

# Outcome status of a cell whose job was cancelled before it wrote a record: no record is written,
# so the next run of the sweep computes the cell (a failed record would need --retry-failed).
CANCELLED_OUTCOME = "cancelled"
# Seconds a just-submitted job may be missing from squeue, seconds an ended job's result pickle may
# take to show up on a shared filesystem, and seconds a preempted job may take to be requeued, before
# the job counts as ended without a result.
_APPEAR_S, _RESULT_GRACE_S, _REQUEUE_GRACE_S = 60.0, 10.0, 180.0


class ExecutorUnavailableError(RuntimeError):
    """The chosen executor cannot run here (no GPU, missing optional package)."""


class Executor(Protocol):
    """Runs cells and reports one outcome per cell (order not guaranteed)."""

    def run_cells(self, cells: Sequence[Cell]) -> list[Outcome]:
        """Run ``cells``; a failing cell is recorded and reported, never raised."""
        ...


class InProcessExecutor:
    """Groups one after another in this process (sequential, on this process's device)."""

    def run_cells(self, cells: Sequence[Cell]) -> list[Outcome]:
        outcomes: list[Outcome] = []
        for group in group_cells(cells):
            outcomes += run_group(group)
        return outcomes


def _gpu_worker(tasks: Any, results: Any) -> None:
    """Worker loop of :class:`LocalGpusExecutor`: run groups until the ``None`` sentinel."""
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s gpu{os.environ.get('CUDA_VISIBLE_DEVICES')} "
                        "%(levelname)s %(name)s: %(message)s")
    while (item := tasks.get()) is not None:
        index, group = item
        results.put((index, run_group(group)))


def visible_gpus() -> list[str]:
    """The GPU ids this process may use, as ``CUDA_VISIBLE_DEVICES`` names them."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    listed = [g.strip() for g in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if g.strip()]
    # Keep the parent's own restriction: children must see a subset of what it may use.
    return listed[:count] if listed else [str(i) for i in range(count)]


class LocalGpusExecutor:
    """One worker process per local GPU, each pinned to its GPU, pulling groups from a queue.

    Args:
        gpus: GPU ids to use (default: every visible GPU).

    Raises:
        ExecutorUnavailableError: on a machine without CUDA GPUs.
    """

    def __init__(self, gpus: Sequence[str] | None = None) -> None:
        self.gpus = list(gpus) if gpus is not None else visible_gpus()
        if not self.gpus:
            raise ExecutorUnavailableError(
                "--executor local-gpus needs CUDA GPUs, but torch sees none on this machine; "
                "use --executor inprocess here (or --executor submitit for a cluster)"
            )

    def run_cells(self, cells: Sequence[Cell]) -> list[Outcome]:
        groups = group_cells(cells)
        if not groups:
            return []
        # spawn, not fork: each child initialises CUDA itself, after its pinning is in place.
        ctx = mp.get_context("spawn")
        tasks, results = ctx.Queue(), ctx.Queue()
        for item in enumerate(groups):
            tasks.put(item)
        workers = []
        saved = os.environ.get("CUDA_VISIBLE_DEVICES")
        try:
            for gpu in self.gpus[: len(groups)]:
                tasks.put(None)
                # A spawned child copies the parent's environment when it starts.
                os.environ["CUDA_VISIBLE_DEVICES"] = gpu
                proc = ctx.Process(target=_gpu_worker, args=(tasks, results), name=f"svdbench-gpu{gpu}")
                proc.start()
                workers.append(proc)
        finally:
            if saved is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = saved
        log.info("local-gpus: %d group(s) on %d worker(s) (GPUs %s)", len(groups), len(workers), ",".join(self.gpus))
        done: dict[int, list[Outcome]] = {}
        while len(done) < len(groups):
            try:
                index, outs = results.get(timeout=2.0)
                done[index] = outs
            except queue.Empty:
                if not any(w.is_alive() for w in workers):
                    break
        for w in workers:
            w.join(timeout=10)
        outcomes: list[Outcome] = []
        for index, group in enumerate(groups):
            if index in done:
                outcomes += done[index]
            else:
                codes = ",".join(str(w.exitcode) for w in workers)
                msg = f"local-gpus worker died before finishing this group (worker exit codes {codes})"
                outcomes += [record_failure(c, msg) for c in group]
        return outcomes


def require_submitit() -> Any:
    """Import submitit, or explain how to install it.

    Raises:
        ExecutorUnavailableError: when submitit is not installed.
    """
    try:
        import submitit
    except ImportError as exc:
        raise ExecutorUnavailableError(
            "--executor submitit needs the optional package submitit: pip install 'svdbench[slurm]' "
            "(or pip install submitit)"
        ) from exc
    return submitit


class SubmititExecutor:
    """The cells as one submitit job array (``map_array``): one task per cell, or per group.

    Each task requests the spec's GPUs, CPUs, memory and time limit (``unit: cell``: per cell) and
    runs :class:`~harness.sweep.worker.GroupJob`, which submitit checkpoints and requeues when
    SLURM signals a timeout or a preemption (``--signal USR2@90``; ``--requeue`` also lets the
    scheduler requeue it on node failure). A requeued task reruns its cells, and the engine skips
    every cell that already has an ok record, so a record is never computed twice; its statistics
    come back from the on-disk cache. The array's run keys go to a submission manifest
    (:mod:`harness.sweep.submissions`) for ``--status``.

    On SLURM, jobs are followed with ``squeue`` (``sacct`` as a fallback) rather than submitit's
    ``sacct``-only watcher, which never sees a job end on clusters without accounting storage. A
    task cancelled (or preempted and not requeued) before writing its record leaves the cell without
    one (outcome ``cancelled``: the next run computes it); a task that ends any other way without a
    result (out of memory, time limit, node failure) gets a ``failed`` record with its log's tail.

    Jobs are fresh interpreters (``python -m submitit.core._submit`` with this interpreter, in this
    working directory, with this environment), so svdbench must be importable there: installed,
    or on ``PYTHONPATH``.

    Args:
        settings: The spec's ``submitit`` section.
        results: The results directory; logs go to ``<results>/.submitit/%j`` unless
            ``settings.folder`` says otherwise (it must be on a filesystem the nodes share).
        name: Job name.
        poll_s: Longest wait between two looks at the scheduler while jobs run.

    Raises:
        ExecutorUnavailableError: when submitit is not installed.
    """

    def __init__(self, settings: SubmititSpec, results: str | Path, name: str = "svdbench",
                 poll_s: float = 30.0) -> None:
        self.submitit = require_submitit()
        self.settings = settings
        self.results = Path(results).expanduser().resolve()
        self.folder = settings.folder or str(self.results / ".submitit" / "%j")
        self.name = name
        self.poll_s = poll_s

    def parameters(self) -> dict[str, Any]:
        """``AutoExecutor.update_parameters`` arguments (None values and zero GPUs dropped)."""
        s = self.settings
        params = {
            "name": f"svdbench-{self.name}", "timeout_min": s.timeout_min,
            # SLURM rejects --gpus-per-node=0 where no GPU gres is configured: ask for none instead.
            "gpus_per_node": s.gpus_per_node or None,
            "cpus_per_task": s.cpus_per_task, "mem_gb": s.mem_gb, "slurm_partition": s.partition,
            "slurm_array_parallelism": s.array_parallelism,
            "slurm_additional_parameters": {"requeue": True, **dict(s.sbatch)},
        }
        return {k: v for k, v in params.items() if v is not None}

    def units(self, cells: Sequence[Cell]) -> list[list[Cell]]:
        """The array's tasks: one cell each (``unit: cell``) or one group each (``unit: group``)."""
        groups = group_cells(cells)
        if self.settings.unit == "group":
            return groups
        return [[cell] for group in groups for cell in group]

    def run_cells(self, cells: Sequence[Cell]) -> list[Outcome]:
        if not cells:
            return []
        executor = self.submitit.AutoExecutor(folder=self.folder, cluster=self.settings.cluster)
        executor.update_parameters(**self.parameters())
        slurm = executor.cluster == "slurm"
        attached = self._attach(cells) if slurm else []
        busy = {c.key for _, unit in attached for c in unit}
        units = self.units([c for c in cells if c.key not in busy])
        jobs = executor.map_array(GroupJob(), units) if units else []
        if jobs:
            submitted = time.time()
            record_submission(self.results, {
                cell.key: SubmittedJob(job.job_id, executor.cluster, len(unit), str(job.paths.stderr), submitted,
                                       self.folder)
                for job, unit in zip(jobs, units, strict=True) for cell in unit
            })
            log.info("submitit (%s): %d job(s) submitted, logs in %s", executor.cluster, len(jobs), self.folder)
            for job, unit in zip(jobs, units, strict=True):
                log.info("job %s: %s", job.job_id, "; ".join(c.describe() for c in unit))
        pairs = [*zip(jobs, units, strict=True), *attached]
        if slurm:
            return self._follow_slurm(pairs)
        outcomes: list[Outcome] = []
        for job, unit in pairs:
            outcomes += self._collect(job, unit)
        return outcomes

    def _attach(self, cells: Sequence[Cell]) -> list[tuple[Any, list[Cell]]]:
        """Jobs of an earlier submission still pending or running for some of ``cells``, with those
        cells: followed instead of submitted again (a sweep rerun while its first submitter is gone
        must not compute a cell twice)."""
        latest = latest_jobs(self.results)
        mine = {c.key: latest[c.key] for c in cells if c.key in latest and latest[c.key].cluster == "slurm"}
        try:
            states = job_states({j.job_id for j in mine.values()})
        except SchedulerUnreachableError as exc:
            log.warning("cannot ask SLURM about earlier jobs (%s); submitting every missing cell", exc)
            return []
        by_job: dict[str, tuple[SubmittedJob, list[Cell]]] = {}
        for cell in cells:
            job = mine.get(cell.key)
            if job is not None and (state := states.get(job.job_id)) is not None and state.active:
                by_job.setdefault(job.job_id, (job, []))[1].append(cell)
        attached = []
        for job_id, (job, unit) in by_job.items():
            log.info("%s from an earlier submission: following it for %s instead of resubmitting",
                     states[job_id].describe(job_id), "; ".join(c.describe() for c in unit))
            attached.append((self.submitit.SlurmJob(folder=job.folder or self.folder, job_id=job_id), unit))
        return attached

    def _collect(self, job: Any, unit: Sequence[Cell]) -> list[Outcome]:
        """The outcomes a finished job returned for ``unit``, or failures carrying its exception."""
        keys = {c.key for c in unit}
        try:
            # A followed group job also reports the cells of its group that were done before.
            return [o for o in job.result() if o.cell.key in keys]
        except Exception as exc:  # FailedJobError, UncompletedJobError (timeout, preemption, OOM)
            msg = f"submitit job {job.job_id} failed: {exc}"
            log.error("%s", msg)
            return [record_failure(c, msg) for c in unit]

    def _ended_without_result(self, job: Any, unit: Sequence[Cell], state: JobState | None) -> list[Outcome]:
        """Outcomes of a SLURM job that ended without a result pickle (cancelled, killed, lost)."""
        described = state.describe(job.job_id) if state is not None else f"job {job.job_id} ended (state unknown)"
        outcomes = []
        for cell in unit:
            if cell_status(cell) == DONE:  # finished before the job ended
                outcomes.append(Outcome(cell, "ok"))
            elif state is not None and state.state in (CANCELLED, PREEMPTED):
                outcomes.append(Outcome(cell, CANCELLED_OUTCOME, described))
            else:
                tail = "\n".join((job.stderr() or "").splitlines()[-40:])
                outcomes.append(record_failure(
                    cell, f"SLURM {described} without a result; log {job.paths.stderr}:\n{tail}"))
        log.warning("%s: %s", described, ", ".join(f"{o.cell.describe()} {o.status}" for o in outcomes))
        return outcomes

    def _follow_slurm(self, pairs: Sequence[tuple[Any, Sequence[Cell]]]) -> list[Outcome]:
        """Wait for every job to leave the queue, then take its result pickle, or, when none shows up
        within a grace period (a shared filesystem can show a job's end before its last file), count
        it as cancelled or killed. Polls every second at first, then up to every ``poll_s`` seconds.

        A pickle is only read once the scheduler lists the job as ended: a requeued job can leave one
        behind from the attempt it interrupted (submitit writes an error pickle when the requeue is
        itself interrupted), which its next attempt overwrites.
        """
        waiting = {job.job_id: (job, unit) for job, unit in pairs}
        outcomes: list[Outcome] = []
        start, last = time.monotonic(), dict.fromkeys(waiting, "")
        ended_at: dict[str, float] = {}
        while waiting:
            try:
                states, unreachable = job_states(waiting), False
            except SchedulerUnreachableError as exc:
                # A restarting controller is not a job's end: keep every job waiting.
                log.warning("cannot ask SLURM about the jobs (%s); retrying", exc)
                states, unreachable = {}, True
            now = time.monotonic()
            for job_id, (job, unit) in list(waiting.items()):
                state = states.get(job_id)
                if state is not None and state.state != last[job_id]:
                    log.info("%s", state.describe(job_id))
                    last[job_id] = state.state
                # A job the scheduler does not list yet is given a while to appear.
                if unreachable or (state is not None and state.active) or (state is None and now - start < _APPEAR_S):
                    ended_at.pop(job_id, None)
                    continue
                if job.paths.result_pickle.exists():
                    done = self._collect(job, unit)
                    log.info("job %s finished: %s", job_id, ", ".join(f"{o.cell.describe()} {o.status}" for o in done))
                    outcomes += done
                elif now - ended_at.setdefault(job_id, now) < (
                        _REQUEUE_GRACE_S if state is not None and state.state == PREEMPTED else _RESULT_GRACE_S):
                    continue
                else:
                    outcomes += self._ended_without_result(job, unit, state)
                del waiting[job_id]
            if waiting:
                time.sleep(min(self.poll_s, 1.0 + (time.monotonic() - start) / 10))
        return outcomes


def make_executor(name: str, spec: SweepSpec) -> Executor:
    """The executor called ``name`` (``inprocess``, ``local-gpus`` or ``submitit``) for ``spec``.

    Raises:
        ValueError: for an unknown name.
        ExecutorUnavailableError: when it cannot run here.
    """
    if name == "inprocess":
        return InProcessExecutor()
    if name == "local-gpus":
        return LocalGpusExecutor()
    if name == "submitit":
        return SubmititExecutor(spec.submitit, spec.results, spec.name)
    raise ValueError(f"unknown executor {name!r}; use inprocess, local-gpus or submitit")
