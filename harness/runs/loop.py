"""The one run loop: ``svdbench run`` and every sweep executor run their cells through :func:`run_cells`.

One model load and one calibration per call (a :class:`harness.runs.session.Session`); the dense
record first when asked for, then each (method, ratio) cell: compress, evaluate, build the record
(:mod:`harness.records`), sign and write it atomically (:func:`harness.integrity.write_record`),
restore the dense model. Every output folder is checked before the model loads
(:mod:`harness.runs.preflight`).

Several processes may run cells of one results folder at once (``svdbench run`` twice, two sweeps
of one spec, SLURM tasks). Each cell is claimed before it is computed (:mod:`harness.work_claims`): a
cell another live process is computing is put off, the other cells are done first, then this
process waits for it and takes its record (or computes it, when the other process died or failed).
A cell whose record exists, parses and verifies (:mod:`harness.integrity`) with status ``ok`` is
skipped, so a rerun resumes; a tampered record is moved aside and its cell recomputed. A failing
cell is recorded with its traceback (never over another process's ``ok`` record) and the others
still run. An export that fails keeps the cell's metrics: the record says ``export: {status:
failed, error}``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.cache import cache_root
from harness.engine.models import require_weights
from harness.integrity import trusted_record, write_record
from harness.records import (
    cell_record,
    dense_record,
    failed_record,
    peak_memory_bytes,
    provenance,
    read_record,
    record_header,
    run_key,
)
from harness.runs.compressions import StoredCompressionError
from harness.runs.config import RunConfig, eval_options, prepare
from harness.runs.export import compress_and_export, export_cell
from harness.runs.preflight import preflight_outputs
from harness.runs.session import CompressedCell, Session
from harness.work_claims import Claim, try_claim, wait_for
from methods._linalg import default_svd_driver

__all__ = ["DENSE", "CellOutcome", "run", "run_cells"]

log = logging.getLogger(__name__)

DENSE = "dense"  # the method name of the dense record
RATIO_SHORTFALL = 1e-3  # achieved this much below the requested ratio: warned and recorded

#: Where a cell's outcome came from: computed by this call, a finished record found before it
#: started, or a record another process finished while this one waited.
HERE, DONE_BEFORE, OTHER = "here", "done", "other"


@dataclass(frozen=True)
class CellOutcome:
    """One cell of :func:`run_cells`: ``status`` ``ok`` or ``failed`` (``error``: the traceback);
    ``path`` is its record (None when the run could not start).

    ``source`` says who produced an ok record (:data:`HERE`, :data:`DONE_BEFORE`, :data:`OTHER`);
    ``recorded`` whether this call wrote the failed record; ``export_error`` an export that failed
    while the cell's metrics were recorded."""

    method: str
    ratio: float
    status: str
    path: Path | None = None
    error: str | None = None
    source: str = HERE
    recorded: bool = False
    export_error: str | None = None


Hook = Callable[[str, float], None]


def _evaluation_block(session: Session, placement: str) -> dict[str, Any]:
    options = eval_options(session.cfg.eval_options)
    return {"placement": placement, **({"options": options} if options else {})}


def _header(session: Session, key: str, method: dict[str, Any], ratio: float, calib: dict[str, Any] | None,
            fields: dict[str, Any]) -> dict[str, Any]:
    prep = session.prep
    return record_header(key, session.model_info, session.cfg.limit, provenance(prep.device, prep.dtype, session.cfg.seed),
                         method, ratio, calib, key_fields=fields)


def _done(path: Path, fields: dict[str, Any] | None = None) -> bool:
    """Whether ``path`` holds an ok record that verifies (a tampered one is moved aside and logged)."""
    rec = trusted_record(path, fields)
    return rec is not None and rec.get("status") == "ok"


def _keep_unsaved(record: dict[str, Any]) -> Path | None:
    """Write a record that could not be written to its results folder somewhere it can be recovered."""
    name = f"{record.get('run_key')}.json"
    for folder in (cache_root() / "unsaved-records", Path(tempfile.gettempdir()) / "svdbench-unsaved-records"):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(record, indent=1, default=str), encoding="utf-8")
            return folder / name
        except OSError:
            continue
    return None


def _write(path: Path, record: dict[str, Any]) -> bool:
    """:func:`write_record`; when the results folder refuses it (full, read-only since the preflight),
    the computed record is kept elsewhere and logged with its metrics, then the error is raised."""
    try:
        return write_record(path, record)
    except OSError as exc:
        kept = _keep_unsaved(record)
        log.error("could not write the record %s (%s); the computed record is kept in %s; its metrics: %s", path,
                  exc, kept or "no writable folder (see the metrics here)", json.dumps(record.get("metrics"), default=str))
        raise OSError(f"could not write the record {path} ({exc.strerror or exc}); the computed record is kept in "
                      f"{kept or 'the log'}") from exc


def run_dense(session: Session) -> Path:
    """Evaluate the dense model once per (model, protocols); an existing ok record is reused."""
    session.references()
    fields = session.dense_fields()
    key = run_key(fields)
    path = session.results / f"{key}.json"
    if _done(path, fields):
        log.info("dense record exists: %s", path)
        return path
    evaluated = session.evaluate()
    header = _header(session, key, {"name": DENSE, "config": {}}, 0.0, None, fields)
    targets = sum(m.params for m in session.layout.modules)
    total = sum(p.numel() for p in session.model.parameters())
    timings = {"load": session.load_s, "statistics": 0.0, "compress": 0.0, "eval": evaluated.seconds}
    _write(path, dense_record(header, targets, total, evaluated.metrics, _evaluation_block(session, evaluated.placement),
                              timings, peak_memory_bytes(session.prep.device)["bytes"]))
    return path


def _export(session: Session, method: Any, ratio: float, key: str, cell: CompressedCell) -> dict[str, Any]:
    """Export the compressed model; a failure is reported in the block, never raised (the cell's
    metrics are kept; a rerun retries the export)."""
    try:
        out = export_cell(session, method, ratio, key, cell.result)
        return {"status": "ok", "path": str(out)}
    except Exception as exc:
        log.error("export of %s @ %g to %s failed (the cell's metrics are recorded; a rerun retries it): %s",
                  method.name, ratio, session.cfg.export, exc)
        return {"status": "failed", "error": traceback.format_exc()}


def _ratio_shortfall(method: str, ratio: float, achieved: float) -> dict[str, float]:
    if achieved >= ratio - RATIO_SHORTFALL:
        return {}
    log.warning("%s @ %g removed only %.4f of the target parameters (%.4f short of the requested ratio): the "
                "method cannot remove more (every factor keeps at least rank 1)", method, ratio, achieved,
                ratio - achieved)
    return {"ratio_shortfall": ratio - achieved}


def run_cell(session: Session, method_name: str, ratio: float) -> Path:
    """Compress with the named method at ``ratio``, evaluate, write the record, restore the model.

    Raises:
        Exception: whatever failed, after writing a ``failed`` record with the traceback.
    """
    method = next(m for m in session.prep.methods if m.name == method_name)
    fields = session.cell_fields(method, ratio)
    key = run_key(fields)
    path = session.results / f"{key}.json"
    cfg = session.cfg
    if _done(path, fields):
        log.info("cell done already: %s @ %.2f -> %s", method.name, ratio, path)
        if cfg.export:
            compress_and_export(session, method, ratio)  # no-op when the cell's export exists
        return path
    assert session.calibration is not None
    header = _header(session, key, {"name": method.name, "config": method.config()}, ratio,
                     session.calibration.record(), fields)
    try:
        with session.compression_claim(method, ratio):
            cell = session.install_stored(method, ratio) or session.compress(method, ratio)
            try:
                # What the record says about the compression: kept by the store, or computed here (and stored).
                stored = cell.stored["record"] if cell.stored is not None else _compression_record(session, cell)
                compression = _compression_block(session, cell, stored)
            except BaseException:
                session.restore(cell)
                raise
        try:
            evaluated = session.evaluate()
            export = _export(session, method, ratio, key, cell) if cfg.export else None
        finally:
            session.restore(cell)
    except Exception:
        session.release_claims()
        _write(path, failed_record(header, traceback.format_exc()))
        raise
    if cell.stored is not None:
        # Nothing was computed here: no statistics pass, no probe, no factorization.
        timings = {"load": session.load_s, "statistics": 0.0, "compress": 0.0, "load_compression": cell.seconds,
                   "eval": evaluated.seconds}
    else:
        timings = {"load": session.load_s, **stored["timings_s"], "eval": evaluated.seconds}
    counts = stored["counts"]
    record = cell_record(
        header, counts, evaluated.metrics, _evaluation_block(session, evaluated.placement), timings,
        statistics_cached=cell.stored is not None or stored["statistics_cached"], statistics=stored["statistics"],
        probes=stored["probes"], peak_bytes=peak_memory_bytes(session.prep.device)["bytes"],
        numerics={**stored["numerics"], **_ratio_shortfall(method.name, ratio, counts["achieved_ratio"])},
        layers=stored["layers"], compression=compression,
    )
    if export is not None:
        record["export"] = export
    _write(path, record)
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


def _mtime(path: Path) -> int | None:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _identify(session: Session, method: str, ratio: float) -> tuple[dict[str, Any], Path, str]:
    """A cell's key fields, record path and a description for logs and claims."""
    if method == DENSE:
        fields, what = session.dense_fields(), f"{session.cfg.model} dense"
    else:
        m = next(m for m in session.prep.methods if m.name == method)
        fields, what = session.cell_fields(m, ratio), f"{session.cfg.model} {method} @ {ratio:g} (seed {session.cfg.seed})"
    return fields, session.results / f"{run_key(fields)}.json", what


def _run_one(session: Session, method: str, ratio: float, wait: bool, before: Hook | None,
             after: Hook | None) -> CellOutcome | None:
    """One cell under its claim; None when another live process holds the claim and ``wait`` is False."""
    try:
        fields, path, what = _identify(session, method, ratio)
        if _done(path, fields):
            log.info("cell done already: %s -> %s", what, path)
            if method != DENSE and session.cfg.export:
                run_cell(session, method, ratio)  # exports a finished cell that has no export yet
            return CellOutcome(method, ratio, "ok", path, source=DONE_BEFORE)
        if wait:
            claim = wait_for(path, lambda: _done(path, fields), f"cell {what}")
        else:
            got = try_claim(path, f"cell {what}")
            if not isinstance(got, Claim):
                log.info("cell %s is being computed by %s; doing the other cells first", what, got.describe())
                return None
            claim = got
            if _done(path, fields):
                claim.release()
                claim = None
        if claim is None:
            log.info("cell %s was computed by another process: %s", what, path)
            return CellOutcome(method, ratio, "ok", path, source=OTHER)
    except Exception as exc:
        log.error("cell %s @ %s could not start: %s", method, ratio, exc)
        return CellOutcome(method, ratio, "failed", None, traceback.format_exc())
    mtime = _mtime(path)
    if before is not None:
        before(method, ratio)
    try:
        if method == DENSE:
            run_dense(session)
        else:
            # Evaluations that compare with the dense model need its references even when the
            # dense record exists already (once per session).
            session.references()
            run_cell(session, method, ratio)
        rec = read_record(path, repair=False) or {}
        export_error = (rec.get("export") or {}).get("error") if isinstance(rec.get("export"), dict) else None
        log.info("recorded %s: %s", what, path)
        return CellOutcome(method, ratio, "ok", path, export_error=export_error)
    except Exception as exc:
        log.error("cell %s failed: %s", what, exc)
        recorded = _mtime(path) != mtime and (read_record(path, repair=False) or {}).get("status") == "failed"
        if not recorded and _done(path, fields):  # another process finished it meanwhile (a claim taken over)
            log.warning("cell %s failed here, but another process has recorded it: %s", what, path)
            return CellOutcome(method, ratio, "ok", path, traceback.format_exc(), source=OTHER)
        return CellOutcome(method, ratio, "failed", path if recorded else None, traceback.format_exc(), recorded=recorded)
    finally:
        claim.release()
        session.release_claims()
        if after is not None:
            after(method, ratio)


def run_cells(cfg: RunConfig, cells: Sequence[tuple[str, float]], before: Hook | None = None,
              after: Hook | None = None) -> list[CellOutcome]:
    """Run ``cells`` (``(method name or "dense", ratio)``, dense first when present) on one loaded model.

    Args:
        cfg: The run (model, calibration, evaluations; ``cfg.methods`` must name every cell's method).
        cells: The cells to run, in order.
        before / after: Called with ``(method, ratio)`` around each cell this process computes (the
            sweep marks cells as running for ``--status``); ``after`` runs however the cell ends.

    Returns:
        One outcome per cell, in order. When the model cannot be loaded (or an output folder fails
        its preflight) every cell is ``failed`` with that traceback and no record is written here
        (the caller decides). Cells another live process is computing are done last, after waiting
        for that process (module docstring).
    """
    try:
        prep = prepare(cfg)
        require_weights(cfg.model)
        preflight_outputs(cfg, cells)
        torch.manual_seed(cfg.seed)
        session = Session(prep)
    except Exception:
        tb = traceback.format_exc()
        log.error("run on %s (seed %d) could not start:\n%s", cfg.model, cfg.seed, tb)
        return [CellOutcome(m, r, "failed", None, tb) for m, r in cells]
    outcomes: dict[int, CellOutcome] = {}
    put_off: list[int] = []
    for i, (method, ratio) in enumerate(cells):
        log.info("cell %d/%d: %s%s", i + 1, len(cells), method, "" if method == DENSE else f" @ {ratio:g} (seed {cfg.seed})")
        outcome = _run_one(session, method, ratio, False, before, after)
        if outcome is None:
            put_off.append(i)
        else:
            outcomes[i] = outcome
    for i in put_off:
        method, ratio = cells[i]
        log.info("cell %d/%d (put off): %s%s", i + 1, len(cells), method, "" if method == DENSE else f" @ {ratio:g}")
        outcomes[i] = _run_one(session, method, ratio, True, before, after)  # type: ignore[assignment]
    return [outcomes[i] for i in range(len(cells))]


def run(cfg: RunConfig) -> list[Path]:
    """``svdbench run``: dense first, then every (method, ratio) of ``cfg``. Returns the record paths.

    Bad input and unwritable outputs fail before the model loads. A failing cell is recorded (status
    ``failed`` with its traceback) and the others still run; the run raises at the end when any cell
    failed, or any export failed (those cells keep their metrics).
    """
    names = [m.name for m in prepare(cfg).methods]  # bad input: a clear error before the model loads
    cells = [(DENSE, 0.0)] + [(m, r) for m in names for r in cfg.ratios]
    require_weights(cfg.model)
    preflight_outputs(cfg, cells)
    outcomes = run_cells(cfg, cells)
    failures = [o for o in outcomes if o.status != "ok"]
    if failures:
        raise RuntimeError(f"{len(failures)} cell(s) failed; see their records in {cfg.results}:\n{failures[0].error}")
    exports = [o for o in outcomes if o.export_error]
    if exports:
        raise RuntimeError(f"{len(exports)} export(s) failed; the cells' metrics are recorded in {cfg.results} "
                           f"(rerun to retry the exports):\n{exports[0].export_error}")
    return [o.path for o in outcomes if o.path is not None]
