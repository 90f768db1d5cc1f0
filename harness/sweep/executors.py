"""Executors: where the groups of a sweep run.

Every executor takes cells, splits them into groups (one model load and one statistics pass each,
see :func:`harness.sweep.plan.group_cells`) and runs :func:`harness.sweep.worker.run_group` on each.
Cells share nothing but the result store and the on-disk statistics cache, so any executor can
resume a sweep started by any other.

* ``inprocess`` (default): the groups one after another in this process.
* ``local-gpus``: one spawned worker per local GPU, pinned with ``CUDA_VISIBLE_DEVICES``, each
  taking groups from a shared queue.
* ``submitit``: one SLURM job per group as a job array (``AutoExecutor.map_array``), or local
  processes with ``cluster: local``. Needs the optional extra ``svdbench[slurm]``.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from harness.sweep.plan import Cell, group_cells
from harness.sweep.spec import SubmititSpec, SweepSpec
from harness.sweep.worker import GroupJob, Outcome, record_failure, run_group

__all__ = [
    "Executor",
    "ExecutorUnavailableError",
    "InProcessExecutor",
    "LocalGpusExecutor",
    "SubmititExecutor",
    "make_executor",
]

log = logging.getLogger(__name__)


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
    """One submitit job per group, submitted as one job array (``map_array``).

    Jobs are fresh interpreters (``python -m submitit.core._submit`` with this interpreter), so
    svdbench must be importable there: installed, or on ``PYTHONPATH``.

    Args:
        settings: The spec's ``submitit`` section.
        results: The results directory; logs go to ``<results>/.submitit/%j`` unless
            ``settings.folder`` says otherwise (it must be on a filesystem the nodes share).
        name: Job name.

    Raises:
        ExecutorUnavailableError: when submitit is not installed.
    """

    def __init__(self, settings: SubmititSpec, results: str | Path, name: str = "svdbench") -> None:
        self.submitit = require_submitit()
        self.settings = settings
        self.folder = settings.folder or str(Path(results).expanduser().resolve() / ".submitit" / "%j")
        self.name = name

    def parameters(self) -> dict[str, Any]:
        """``AutoExecutor.update_parameters`` arguments (None values dropped)."""
        s = self.settings
        params = {
            "name": f"svdbench-{self.name}", "timeout_min": s.timeout_min, "gpus_per_node": s.gpus_per_node,
            "cpus_per_task": s.cpus_per_task, "mem_gb": s.mem_gb, "slurm_partition": s.partition,
            "slurm_array_parallelism": s.array_parallelism,
        }
        return {k: v for k, v in params.items() if v is not None}

    def run_cells(self, cells: Sequence[Cell]) -> list[Outcome]:
        groups = group_cells(cells)
        if not groups:
            return []
        executor = self.submitit.AutoExecutor(folder=self.folder, cluster=self.settings.cluster)
        executor.update_parameters(**self.parameters())
        jobs = executor.map_array(GroupJob(), groups)
        log.info("submitit (%s): %d job(s) submitted, logs in %s", executor.cluster, len(jobs), self.folder)
        outcomes: list[Outcome] = []
        for job, group in zip(jobs, groups, strict=True):
            try:
                outcomes += job.result()
            except Exception as exc:  # FailedJobError, UncompletedJobError (timeout, preemption, OOM)
                msg = f"submitit job {job.job_id} failed: {exc}"
                log.error("%s", msg)
                outcomes += [record_failure(c, msg) for c in group]
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
