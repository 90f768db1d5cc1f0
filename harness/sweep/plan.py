"""A sweep's cells, their run keys and their status in the result store, without loading weights.

Each cell is one result record: the dense baseline of a model, or one (method, ratio, seed) of it.
Its run key comes from :func:`harness.runs.planned_keys` (the same function the engine names
records with), so "is this cell done?" is one file lookup: ``<results>/<run_key>.json``, whose record
must verify (:mod:`harness.integrity`) and name this cell's method, ratio and seed; a record that
does not is ``tampered`` and is recomputed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from harness.integrity import verify_record
from harness.records import read_record
from harness.runs import RunConfig, planned_keys, prepare
from harness.sweep.spec import SpecError, SweepSpec

__all__ = ["Cell", "cell_problems", "cell_status", "format_plan", "group_cells", "plan_cells", "run_config"]

log = logging.getLogger(__name__)

DONE, FAILED, MISSING, TAMPERED = "done", "failed", "missing", "tampered"


@dataclass(frozen=True)
class Cell:
    """One record of a sweep.

    Attributes:
        key: Run key (the record's file name without ``.json``).
        model: The model's label in the spec (reference name or id).
        method: Canonical method string, or ``dense``.
        ratio: Requested ratio (0.0 for dense).
        seed: Calibration seed.
        run: The run config of the cell's group; cells with an equal ``run`` share one model load
            and one set of statistics.
    """

    key: str
    model: str
    method: str
    ratio: float
    seed: int
    run: RunConfig

    @property
    def is_dense(self) -> bool:
        return self.method == "dense"

    @property
    def path(self) -> Path:
        return Path(self.run.results) / f"{self.key}.json"

    def describe(self) -> str:
        if self.is_dense:
            return f"{self.model} dense"
        return f"{self.model} {self.method} @ {self.ratio:g} (seed {self.seed})"


def run_config(spec: SweepSpec, model: str, seed: int) -> RunConfig:
    """The engine's run config for one (model, seed) group of ``spec``.

    The results directory is made absolute because workers (submitit jobs) may start elsewhere.
    """
    cal, ev = spec.calibration, spec.eval
    return RunConfig(
        model=model, methods=spec.grid.methods, ratios=spec.grid.ratios, evals=spec.evals,
        calib=cal.source, calib_samples=cal.samples, calib_seqlen=cal.seqlen,
        eval_seqlen=ev.seqlen, eval_batch_size=ev.batch_size, eval_max_windows=ev.max_windows,
        limit=ev.limit, tasks=ev.tasks, seed=seed, device=spec.device, dtype=spec.dtype,
        results=str(Path(spec.results).expanduser().resolve()), eval_window_stride=ev.window_stride,
        eval_offload=ev.offload, svd_driver=spec.svd_driver, eval_options=ev.options,
        compressed_store=None if spec.compressed_store is None else str(Path(spec.compressed_store).expanduser().resolve()),
        compressed_store_max_gb=spec.compressed_store_max_gb,
    )


def plan_cells(spec: SweepSpec, build_testbeds: bool = True) -> list[Cell]:
    """Every cell of ``spec`` with its run key, dense baselines first within each (model, seed).

    Models are identified by hashing their files and calibrations by hashing their tokens; no
    weights are loaded. Testbed models are resolved first: trained if not cached, unless
    ``build_testbeds`` is False (dry runs), where an untrained one is a :class:`SpecError`.

    Raises:
        SpecError: when a group fails :func:`harness.runs.prepare` or its tokenizer cannot load.
        FileNotFoundError: for missing data (calibration file, evaluation data).
    """
    cells: list[Cell] = []
    dense_seen: set[str] = set()
    for entry in spec.grid.models:
        model = entry.resolve(build=build_testbeds)
        for seed in spec.grid.seeds:
            cfg = run_config(spec, model, seed)
            try:
                keys = planned_keys(prepare(cfg))
            except (ValueError, OSError) as exc:
                if isinstance(exc, FileNotFoundError):
                    raise
                # The engine's messages name `svdbench run` flags; say which sweep entry they are about.
                raise SpecError(f"cannot plan model {entry.label!r} (seed {seed}): {exc}") from exc
            for (method, ratio), key in keys.items():
                if method == "dense":
                    # The dense record does not depend on the calibration seed: plan it once.
                    if key in dense_seen:
                        continue
                    dense_seen.add(key)
                cells.append(Cell(key, entry.label, method, ratio, seed, cfg))
    return cells


def cell_problems(cell: Cell, rec: Mapping[str, object]) -> list[str]:
    """Why ``rec`` (read from ``cell.path``) cannot be this cell's ok record: it fails verification, or
    names another method, ratio or calibration seed than the cell's (a field it lacks contradicts nothing)."""
    problems = verify_record(rec, cell.path).problems
    method = rec.get("method")
    if isinstance(method, Mapping) and "name" in method and method["name"] != cell.method:
        problems.append(f"its method is {method['name']!r}, this cell's {cell.method!r}")
    if "ratio" in rec and rec["ratio"] != cell.ratio:
        problems.append(f"its ratio is {rec['ratio']!r}, this cell's {cell.ratio!r}")
    calibration = rec.get("calibration")
    if not cell.is_dense and isinstance(calibration, Mapping) and "seed" in calibration and calibration["seed"] != cell.seed:
        problems.append(f"its calibration seed is {calibration['seed']!r}, this cell's {cell.seed!r}")
    return problems


def cell_status(cell: Cell) -> str:
    """``done`` (a record with status ok that verifies), ``failed`` (a failed record), ``tampered`` (an ok
    record that does not verify: logged with its file and reason, and recomputed) or ``missing``."""
    rec = read_record(cell.path, repair=False)  # the run that recomputes the cell moves a bad record aside
    if rec is None:
        return MISSING
    if rec.get("status") != "ok":
        return FAILED
    problems = cell_problems(cell, rec)
    if problems:
        log.error("tampered record %s (%s): %s; it does not count as done and will be recomputed", cell.path,
                  cell.describe(), "; ".join(problems))
        return TAMPERED
    return DONE


def group_cells(cells: Iterable[Cell]) -> list[list[Cell]]:
    """Cells grouped by run config (model, calibration, seed, evaluations), in first-seen order."""
    groups: dict[RunConfig, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.run, []).append(cell)
    return list(groups.values())


def format_plan(spec: SweepSpec, cells: Sequence[Cell], statuses: Mapping[str, str]) -> str:
    """The dry-run table: one line per cell with its status, then a summary line."""
    g = spec.grid
    head = (f"sweep {spec.name}: {len(g.models)} model(s) x {len(g.methods)} method(s) x {len(g.ratios)} "
            f"ratio(s) x {len(g.seeds)} seed(s) = {spec.n_cells} cell(s) + {sum(c.is_dense for c in cells)} dense; "
            f"results in {Path(spec.results).expanduser().resolve()}")
    width = max([len(c.model) for c in cells] + [5])
    mwidth = max([len(c.method) for c in cells] + [6])
    lines = [head, f"{'status':<8} {'run key':<20} {'model':<{width}} {'method':<{mwidth}} {'ratio':>5} seed"]
    for c in cells:
        ratio = "-" if c.is_dense else f"{c.ratio:g}"
        seed = "-" if c.is_dense else str(c.seed)
        lines.append(f"{statuses[c.key]:<8} {c.key:<20} {c.model:<{width}} {c.method:<{mwidth}} {ratio:>5} {seed}")
    counts = {s: sum(statuses[c.key] == s for c in cells) for s in (DONE, FAILED, MISSING, TAMPERED)}
    lines.append(f"{counts[DONE]} done, {counts[FAILED]} failed, {counts[MISSING]} missing"
                 + (f", {counts[TAMPERED]} tampered (recomputed by the next run)" if counts[TAMPERED] else ""))
    return "\n".join(lines) + "\n"
