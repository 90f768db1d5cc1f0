"""The one run loop: ``svdbench run`` and every sweep executor run their cells through :func:`run_cells`.

One model load and one calibration per call (a :class:`harness.runs.session.Session`); the dense
record first when asked for, then each (method, ratio) cell: compress, evaluate, build the record
(:mod:`harness.records`), write it atomically, restore the dense model. A cell whose record exists
with status ``ok`` is skipped, so a rerun resumes; a failing cell is recorded with its traceback
and the others still run.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.records import (
    cell_record,
    dense_record,
    failed_record,
    peak_memory_bytes,
    provenance,
    read_record,
    record_header,
    run_key,
    write_json_atomic,
)
from harness.runs.compressions import StoredCompressionError
from harness.runs.config import RunConfig, eval_options, prepare
from harness.runs.export import compress_and_export, export_cell
from harness.runs.session import CompressedCell, Session
from methods._linalg import default_svd_driver

__all__ = ["DENSE", "CellOutcome", "run", "run_cells"]

log = logging.getLogger(__name__)

DENSE = "dense"  # the method name of the dense record


@dataclass(frozen=True)
class CellOutcome:
    """One cell of :func:`run_cells`: ``status`` ``ok`` or ``failed`` (``error``: the traceback);
    ``path`` is its record (None when the run could not start)."""

    method: str
    ratio: float
    status: str
    path: Path | None = None
    error: str | None = None


Hook = Callable[[str, float], None]


def _evaluation_block(session: Session, placement: str) -> dict[str, Any]:
    options = eval_options(session.cfg.eval_options)
    return {"placement": placement, **({"options": options} if options else {})}


def _header(session: Session, key: str, method: dict[str, Any], ratio: float, calib: dict[str, Any] | None) -> dict[str, Any]:
    prep = session.prep
    return record_header(key, session.model_info, session.cfg.limit, provenance(prep.device, prep.dtype, session.cfg.seed),
                         method, ratio, calib)


def _done(path: Path) -> bool:
    rec = read_record(path)
    return rec is not None and rec.get("status") == "ok"


def run_dense(session: Session) -> Path:
    """Evaluate the dense model once per (model, protocols); an existing ok record is reused."""
    session.references()
    key = session.dense_key()
    path = session.results / f"{key}.json"
    if _done(path):
        log.info("dense record exists: %s", path)
        return path
    evaluated = session.evaluate()
    header = _header(session, key, {"name": DENSE, "config": {}}, 0.0, None)
    targets = sum(m.params for m in session.layout.modules)
    total = sum(p.numel() for p in session.model.parameters())
    timings = {"load": session.load_s, "statistics": 0.0, "compress": 0.0, "eval": evaluated.seconds}
    write_json_atomic(path, dense_record(header, targets, total, evaluated.metrics, _evaluation_block(session, evaluated.placement),
                                         timings, peak_memory_bytes(session.prep.device)["bytes"]))
    return path


def run_cell(session: Session, method_name: str, ratio: float) -> Path:
    """Compress with the named method at ``ratio``, evaluate, write the record, restore the model.

    Raises:
        Exception: whatever failed, after writing a ``failed`` record with the traceback.
    """
    method = next(m for m in session.prep.methods if m.name == method_name)
    key = session.cell_key(method, ratio)
    path = session.results / f"{key}.json"
    cfg = session.cfg
    if _done(path):
        log.info("cell done already: %s @ %.2f -> %s", method.name, ratio, path)
        if cfg.export:
            compress_and_export(session, method, ratio)  # no-op when the cell's export exists
        return path
    assert session.calibration is not None
    header = _header(session, key, {"name": method.name, "config": method.config()}, ratio, session.calibration.record())
    try:
        cell = session.install_stored(method, ratio) or session.compress(method, ratio)
    except Exception:
        write_json_atomic(path, failed_record(header, traceback.format_exc()))
        raise
    # What the record says about the compression: kept by the store, or computed here (and stored).
    fields = cell.stored["record"] if cell.stored is not None else _compression_record(session, cell)
    compression = _compression_block(session, cell, fields)
    try:
        evaluated = session.evaluate()
        if cfg.export:
            export_cell(session, method, ratio, key, cell.result)
    except Exception:
        write_json_atomic(path, failed_record(header, traceback.format_exc()))
        raise
    finally:
        session.restore(cell)
    if cell.stored is not None:
        # Nothing was computed here: no statistics pass, no probe, no factorization.
        timings = {"load": session.load_s, "statistics": 0.0, "compress": 0.0, "load_compression": cell.seconds,
                   "eval": evaluated.seconds}
    else:
        timings = {"load": session.load_s, **fields["timings_s"], "eval": evaluated.seconds}
    record = cell_record(
        header, fields["counts"], evaluated.metrics, _evaluation_block(session, evaluated.placement), timings,
        statistics_cached=cell.stored is not None or fields["statistics_cached"], statistics=fields["statistics"],
        probes=fields["probes"], peak_bytes=peak_memory_bytes(session.prep.device)["bytes"],
        numerics=fields["numerics"], layers=fields["layers"], compression=compression,
    )
    write_json_atomic(path, record)
    return path


def _compression_record(session: Session, cell: CompressedCell) -> dict[str, Any]:
    """What a record says about a compression computed in this process (and what the store keeps).

    Timings: ``statistics``, the dense statistics passes run for this cell (0 when read from the
    statistics store); the stages of the compression (allocation includes the probes); ``compress``,
    the whole compression wall time.
    """
    result = cell.result
    return {
        "counts": result.counts(),
        "timings_s": {"statistics": cell.statistics_seconds, **result.timings_s, "compress": cell.seconds},
        "statistics_cached": not cell.statistics_seconds,
        "statistics": {**result.statistics, "svd_driver": default_svd_driver(session.prep.device)},
        "probes": {name: dict(p.last_cost) for name, p in cell.probes.items() if getattr(p, "last_cost", None)},
        "numerics": {**result.numerics, "calibration_tokens_per_layer": session.calibration_tokens()},
        "layers": result.layers,
    }


def _compression_block(session: Session, cell: CompressedCell, fields: dict[str, Any]) -> dict[str, Any]:
    """The record's ``compression`` block: the compression key, where the compressed model came from
    (``computed`` here, or installed from the ``store``), and whether it is stored now.

    A compression computed here is written to the store (when there is one) before it is evaluated;
    a store that cannot take it is reported in the block and the log, and the cell still evaluates.
    """
    key_fields = session.compression_fields(cell.method, cell.ratio)
    key = run_key(key_fields)
    if cell.stored is not None:
        return {"key": key, "source": "store", "store": str(session.store.root) if session.store else None,
                "stored_at": cell.stored.get("created"), "original_timings_s": cell.stored["record"]["timings_s"]}
    block: dict[str, Any] = {"key": key, "source": "computed", "stored": False}
    if session.store is not None:
        try:
            session.store.save(key, session.model, [name for name, _ in cell.result.undo],
                               key_fields, fields)
            block.update(stored=True, store=str(session.store.root))
        except (OSError, StoredCompressionError) as exc:
            log.error("could not store compression %s in %s: %s", key, session.store.root, exc)
            block["store_error"] = str(exc)
    return block


def run_cells(cfg: RunConfig, cells: Sequence[tuple[str, float]], before: Hook | None = None,
              after: Hook | None = None) -> list[CellOutcome]:
    """Run ``cells`` (``(method name or "dense", ratio)``, dense first when present) on one loaded model.

    Args:
        cfg: The run (model, calibration, evaluations; ``cfg.methods`` must name every cell's method).
        cells: The cells to run, in order.
        before / after: Called with ``(method, ratio)`` around each cell (the sweep marks cells as
            running for ``--status``); ``after`` runs however the cell ends.

    Returns:
        One outcome per cell, in order. When the model cannot be loaded every cell is ``failed``
        with that traceback and no record is written here (the caller decides).
    """
    try:
        prep = prepare(cfg)
        torch.manual_seed(cfg.seed)
        session = Session(prep)
    except Exception:
        tb = traceback.format_exc()
        log.error("run on %s (seed %d) could not start:\n%s", cfg.model, cfg.seed, tb)
        return [CellOutcome(m, r, "failed", None, tb) for m, r in cells]
    outcomes: list[CellOutcome] = []
    for i, (method, ratio) in enumerate(cells, 1):
        log.info("cell %d/%d: %s%s", i, len(cells), method, "" if method == DENSE else f" @ {ratio:g} (seed {cfg.seed})")
        if before is not None:
            before(method, ratio)
        try:
            if method == DENSE:
                path = run_dense(session)
            else:
                # Evaluations that compare with the dense model need its references even when the
                # dense record exists already (once per session).
                session.references()
                path = run_cell(session, method, ratio)
            outcomes.append(CellOutcome(method, ratio, "ok", path))
        except Exception as exc:
            log.error("cell %s @ %s failed: %s", method, ratio, exc)
            outcomes.append(CellOutcome(method, ratio, "failed", None, traceback.format_exc()))
        finally:
            if after is not None:
                after(method, ratio)
    return outcomes


def run(cfg: RunConfig) -> list[Path]:
    """``svdbench run``: dense first, then every (method, ratio) of ``cfg``. Returns the record paths.

    A failing cell is recorded (status ``failed`` with its traceback) and the others still run;
    the run raises at the end when any cell failed.
    """
    names = [m.name for m in prepare(cfg).methods]  # bad input: a clear error before the model loads
    outcomes = run_cells(cfg, [(DENSE, 0.0)] + [(m, r) for m in names for r in cfg.ratios])
    failures = [o for o in outcomes if o.status != "ok"]
    if failures:
        raise RuntimeError(f"{len(failures)} cell(s) failed; see their records in {cfg.results}:\n{failures[0].error}")
    return [o.path for o in outcomes if o.path is not None]
