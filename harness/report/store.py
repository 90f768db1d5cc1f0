"""Load the result-record store (one JSON file per cell) into a flat pandas DataFrame.

Every report is built from this frame, never from live runs or logs. One row per record; the
columns are the cell identity (model, method, config, ratio, calibration, seed, limit), the
accounting (achieved ratios, parameter counts), provenance, and every scalar under ``metrics``
flattened to a dotted key (``wikitext2.ppl``, ``zeroshot.tasks.piqa.value``). lm-eval's verbatim
``raw`` dict is left out: it is for forensics, not tables. Per-document correctness (a zero-shot
task's ``per_doc``: document ids and one '0'/'1' character per document) is no cell value either: it
goes, keyed by the dotted path of its owner (``zeroshot.tasks.piqa``), into the one ``per_doc``
column, where the paired tie rule (:mod:`harness.report.paired`) reads it.

Every record is verified first (:func:`harness.integrity.verify_record`: its digest, its run key
against its content, its metrics against what they are computed from); the ``integrity`` column says
``signed`` or ``unsigned`` (written before digests). A tampered record is never a row of a table: it
is logged as an error naming its file and the failed check (and kept, as a ``tampered`` row, only
for :func:`harness.report.compare.compare`, which fails on it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from harness.integrity import TAMPERED, verify_record
from harness.report.metrics import (  # re-exported: metric lookup is part of the store's API
    MetricSpec,
    UnknownMetricError,
    metric_columns,
    resolve_metric,
)

__all__ = [
    "SUPPORTED_SCHEMA_VERSIONS",
    "StoreError",
    "MetricSpec",
    "UnknownMetricError",
    "resolve_metric",
    "metric_columns",
    "read_records",
    "value_text",
    "flatten_metrics",
    "per_doc_metrics",
    "canonical_config",
    "records_to_frame",
    "load_store",
    "as_frame",
]

logger = logging.getLogger(__name__)

SUPPORTED_SCHEMA_VERSIONS = frozenset({1})
_PARTIAL_RE = re.compile(r":first\d+$")

# Identity columns, in the order they appear in the frame (metric columns follow).
_BASE_COLUMNS = [
    "run_key",
    "source_file",
    "status",
    "error",
    "integrity",
    "schema_version",
    "model",
    "model_id",
    "model_revision",
    "model_hash",
    "model_family",
    "n_blocks",
    "method",
    "method_config",
    "config_hash",
    "allocator",
    "factorizer",
    "refiner",
    "ratio",
    "achieved_ratio",
    "achieved_ratio_model",
    "params_dense",
    "params_compressed",
    "params_model_dense",
    "params_model_compressed",
    "calib_source",
    "calib_samples",
    "calib_seqlen",
    "calib_seed",
    "calib_token_hash",
    "seed",
    "limit",
    "limited",
    "partial_windows",
    "git_sha",
    "git_dirty",
    "svdbench_version",
    "device",
    "dtype",
    "sweep_id",
    "peak_memory_bytes",
    "layers",
    "per_doc",
]


class StoreError(ValueError):
    """A record file is unreadable or malformed; the message names the file."""


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read every result record under ``path`` (a directory, searched recursively, or one file).

    Hidden files (names starting with ``.``, e.g. the engine's atomic-write temporaries) are
    ignored. Valid JSON that is not a record (no ``run_key``/``schema_version``, e.g. a spectra
    dump or a sweep manifest living in the same directory, or the ``svdbench.json`` manifest of an
    export folder, which names a ``format``) is skipped with an info log.

    Args:
        path: A results directory or a single ``.json`` record.

    Returns:
        The records, each with an added ``_source_file`` key, sorted by file path.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        StoreError: For invalid JSON, or a record with an unsupported schema or missing fields.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"results path does not exist: {root}")
    files = [root] if root.is_file() else sorted(root.rglob("*.json"))
    records: list[dict[str, Any]] = []
    for file in files:
        if any(part.startswith(".") for part in file.relative_to(root).parts if part != "."):
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise StoreError(
                f"{file}: invalid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
            ) from exc
        if not isinstance(data, dict) or not ({"run_key", "schema_version"} & data.keys()):
            logger.info("skipping %s: not a result record", file)
            continue
        if "format" in data and "schema_version" not in data:  # an export's (or a store's) manifest
            logger.info("skipping %s: a %s manifest, not a result record", file, data["format"])
            continue
        _validate(data, file)
        data["_source_file"] = str(file)
        records.append(data)
    return records


def _validate(rec: Mapping[str, Any], file: Path | str) -> None:
    version = rec.get("schema_version")
    if version not in SUPPORTED_SCHEMA_VERSIONS:
        raise StoreError(
            f"{file}: unsupported schema_version {version!r} (this reader understands "
            f"{sorted(SUPPORTED_SCHEMA_VERSIONS)}); upgrade svdbench or migrate the record"
        )
    missing = [k for k in ("run_key", "status", "model", "method", "ratio") if k not in rec]
    if missing:
        raise StoreError(f"{file}: record is missing required field(s) {', '.join(missing)}")
    if rec["status"] not in ("ok", "failed"):
        raise StoreError(f"{file}: status must be 'ok' or 'failed', got {rec['status']!r}")


_PER_DOC = "per_doc"  # per-document correctness: a column of its own, never flattened into cells


def _flatten(prefix: str, value: Any, out: dict[str, Any], per_doc: dict[str, Any] | None = None) -> None:
    """Walk ``value``: scalars into ``out`` under their dotted key; ``per_doc`` blocks into ``per_doc``."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            if k == "raw":  # lm-eval's verbatim output: kept in the record, not in tables
                continue
            if k == _PER_DOC:
                # Thousands of characters per task: no table column, but the tie rule needs them.
                if per_doc is not None and isinstance(v, Mapping):
                    per_doc[prefix] = dict(v)
                continue
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out, per_doc)
    elif value is None or isinstance(value, (bool, int, float, str)):
        out[prefix] = value
    # Lists (e.g. per-window losses) have no single cell value; leave them in the record.


def flatten_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """A record's ``metrics`` as the store flattens them: dotted key -> scalar (lm-eval ``raw``,
    ``per_doc`` blocks and lists left out)."""
    out: dict[str, Any] = {}
    _flatten("", metrics or {}, out)
    return out


def per_doc_metrics(metrics: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """A record's per-document blocks: the dotted path of their owner (``zeroshot.tasks.piqa``) ->
    ``{"doc_ids": [...], "acc": "0110...", "acc_norm": "..."}``; empty for records without them."""
    out: dict[str, dict[str, Any]] = {}
    _flatten("", metrics or {}, {}, out)
    return out


def value_text(value: object) -> str:
    """Stable text of a frame cell for identity keys: missing -> "", integral floats without ".0".

    pandas upcasts integer columns with gaps (dense records have no calibration) to float, so
    ``32`` and ``32.0`` must compare equal.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def canonical_config(config: Any) -> str:
    """Canonical JSON of a method config, used as part of a cell's identity."""
    return json.dumps(config if config is not None else {}, sort_keys=True, separators=(",", ":"))


def _row(rec: Mapping[str, Any], source: str | None) -> dict[str, Any]:
    model = rec.get("model") or {}
    method = rec.get("method") or {}
    config = method.get("config") or {}
    calib = rec.get("calibration") or {}
    prov = rec.get("provenance") or {}
    cfg_json = canonical_config(config)

    def stage(name: str) -> str | None:
        part = config.get(name)
        return part.get("name") if isinstance(part, Mapping) else part

    row: dict[str, Any] = {
        "run_key": rec.get("run_key"),
        "source_file": source,
        "status": rec.get("status"),
        "error": rec.get("error"),
        "schema_version": rec.get("schema_version"),
        "model": model.get("name") or Path(str(model.get("id", "?"))).name,
        "model_id": model.get("id"),
        "model_revision": model.get("revision"),
        "model_hash": model.get("content_hash"),
        "model_family": model.get("family"),
        "n_blocks": model.get("n_blocks"),
        "method": method.get("name"),
        "method_config": cfg_json,
        "config_hash": hashlib.sha256(cfg_json.encode()).hexdigest()[:8],
        "allocator": stage("allocator"),
        "factorizer": stage("factorizer"),
        "refiner": stage("refiner"),
        "ratio": float(rec["ratio"]) if rec.get("ratio") is not None else math.nan,
        "achieved_ratio": rec.get("achieved_ratio"),
        "achieved_ratio_model": rec.get("achieved_ratio_model"),
        "params_dense": rec.get("params_dense"),
        "params_compressed": rec.get("params_compressed"),
        "params_model_dense": rec.get("params_model_dense"),
        "params_model_compressed": rec.get("params_model_compressed"),
        "calib_source": calib.get("source"),
        "calib_samples": calib.get("samples"),
        "calib_seqlen": calib.get("seqlen"),
        "calib_seed": calib.get("seed"),
        "calib_token_hash": calib.get("token_hash"),
        # The run seed lives in provenance; older/partial records only have the calibration seed.
        "seed": prov.get("seed", calib.get("seed")),
        "limit": rec.get("limit"),
        "git_sha": prov.get("git_sha"),
        "git_dirty": prov.get("git_dirty"),
        "svdbench_version": prov.get("svdbench_version"),
        "device": prov.get("device"),
        "dtype": prov.get("dtype"),
        "sweep_id": rec.get("sweep_id", prov.get("sweep_id")),
        "peak_memory_bytes": rec.get("peak_memory_bytes"),
        "layers": list(rec.get("layers") or []),
    }
    for name, secs in (rec.get("timings_s") or {}).items():
        row[f"time_{name}_s"] = secs
    metrics: dict[str, Any] = {}
    per_doc: dict[str, Any] = {}
    _flatten("", rec.get("metrics") or {}, metrics, per_doc)
    row.update(metrics)
    row["per_doc"] = per_doc or None
    # A record is "limited" if the run or any evaluation inside it used lm-eval --limit.
    row["limited"] = row["limit"] is not None or any(
        k.endswith(".limit") and v is not None for k, v in metrics.items()
    )
    # --eval-max-windows N scores only the first N windows; the protocol id then ends in ":firstN".
    row["partial_windows"] = any(
        k.endswith(".protocol") and isinstance(v, str) and _PARTIAL_RE.search(v) is not None
        for k, v in metrics.items()
    )
    return row


def _verified(rec: Mapping[str, Any], source: str | None) -> tuple[str, str]:
    """``(integrity, reason)`` of a record: ``signed``, ``unsigned`` or ``tampered`` (reason: the checks)."""
    verdict = verify_record(rec, source)
    for note in verdict.notes:
        logger.warning("record %s: %s", source or rec.get("run_key"), note)
    return verdict.status, verdict.reason()


def records_to_frame(records: Iterable[Mapping[str, Any]], include_failed: bool = False,
                     include_rejected: bool = False) -> pd.DataFrame:
    """Flatten result records into one DataFrame row each.

    Args:
        records: Parsed records (schema_version 1).
        include_failed: Keep ``status == "failed"`` records (their metrics are empty); by default
            they are dropped with a warning naming each one.
        include_rejected: Keep records that fail verification as rows with status ``tampered`` (the
            ``error`` column says why; for :func:`harness.report.compare.compare`); by default they
            are dropped with an error naming each file and the failed check.

    Returns:
        A frame with the identity columns first and one column per dotted metric key.

    Raises:
        StoreError: For a malformed record.
    """
    rows = []
    for rec in records:
        source = rec.get("_source_file")
        _validate(rec, source or f"record {rec.get('run_key')!r}")
        integrity, reason = _verified(rec, source)
        if integrity == TAMPERED:
            if not include_rejected:
                logger.error("tampered record %s (%s, %s, ratio %s): %s; left out of every table",
                             source or rec.get("run_key"), (rec.get("model") or {}).get("name"),
                             (rec.get("method") or {}).get("name"), rec.get("ratio"), reason)
                continue
            rows.append({**_row(rec, source), "status": TAMPERED, "error": reason, "integrity": TAMPERED})
            continue
        if rec["status"] == "failed" and not include_failed:
            first_line = str(rec.get("error") or "no error text").strip().splitlines()[-1:] or [""]
            logger.warning(
                "skipping failed record %s (%s, %s, ratio %s): %s",
                source or rec.get("run_key"),
                (rec.get("model") or {}).get("name"),
                (rec.get("method") or {}).get("name"),
                rec.get("ratio"),
                first_line[0],
            )
            continue
        rows.append({**_row(rec, source), "integrity": integrity})
    frame = pd.DataFrame(rows)
    for col in _BASE_COLUMNS:
        if col not in frame.columns:
            frame[col] = pd.Series(dtype=object)
    extra = [c for c in frame.columns if c not in _BASE_COLUMNS]
    frame = frame[_BASE_COLUMNS + extra]
    frame["ratio"] = frame["ratio"].astype(float)
    return frame.reset_index(drop=True)


def load_store(path: str | Path, include_failed: bool = False, include_rejected: bool = False) -> pd.DataFrame:
    """Load every record under a results directory (recursively) into a flat DataFrame.

    Args:
        path: Results directory or a single record file.
        include_failed: Keep failed records (see :func:`records_to_frame`).
        include_rejected: Keep tampered records as ``tampered`` rows (see :func:`records_to_frame`).

    Returns:
        The store frame (possibly empty, with the identity columns).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        StoreError: For invalid JSON or a malformed record; the message names the file.
    """
    records = read_records(path)
    frame = records_to_frame(records, include_failed=include_failed, include_rejected=include_rejected)
    logger.info("loaded %d record(s) from %s (%d file(s) read)", len(frame), path, len(records))
    return frame


def load_stores(paths: Iterable[str | Path], include_failed: bool = False) -> pd.DataFrame:
    """Load several results directories into one store frame, each record once.

    A cell found in two folders (the dense record that a leaderboard folder and an ablation folder
    both hold, or a folder given twice) has one run key; it is kept once, from the first folder that
    holds it, so that no seed count or mean counts a record twice.

    Args:
        paths: Results directories or record files (see :func:`load_store`), in priority order.
        include_failed: Keep failed records.

    Returns:
        The combined store frame.

    Raises:
        FileNotFoundError: If a path does not exist.
        StoreError: For invalid JSON or a malformed record.
    """
    frames = [load_store(path, include_failed=include_failed) for path in paths]
    if not frames:
        raise ValueError("no results directory given")
    frame = pd.concat(frames, ignore_index=True)
    keyed = frame["run_key"].notna()
    repeated = keyed & frame.duplicated("run_key", keep="first")
    if repeated.any():
        logger.info("%d record(s) found in more than one results directory, kept once", int(repeated.sum()))
    return frame[~repeated].reset_index(drop=True)


def as_frame(source: pd.DataFrame | str | Path | Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """Accept a store frame, a results path, or an iterable of records, and return a frame."""
    if isinstance(source, pd.DataFrame):
        return source
    if isinstance(source, (str, Path)):
        return load_store(source)
    return records_to_frame(source)
