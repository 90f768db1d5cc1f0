"""Result records: one JSON file per cell, content-addressed by a run key, written atomically.

The run key is a stable hash of everything that determines a cell's result (model identity, method
config, ratio, calibration, evaluation protocols, svdbench version); the record's file name is the
key, so a re-run finds finished cells and an interrupted sweep resumes without recomputing them.
Each record also carries the fields its key hashes (``key_fields``) and, once written, a content
digest: :mod:`harness.integrity` verifies both, and signs and writes records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from harness.files import quarantine, write_text_atomic

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


def svdbench_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("svdbench")
    except metadata.PackageNotFoundError:
        return "0.1.0+src"


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def run_key(fields: dict[str, Any]) -> str:
    """First 20 hex digits of the SHA-256 of the canonical JSON of ``fields``."""
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()[:20]


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary file in the same directory, fsync, then rename over ``path``.

    A reader never sees a half-written record, and a kill mid-write leaves at most a stray
    ``.tmp`` file, never a truncated ``.json``.
    """
    write_text_atomic(path, json.dumps(obj, indent=1, allow_nan=False, default=str))


def read_record(path: Path, repair: bool = True) -> dict[str, Any] | None:
    """The record at ``path``, or None when absent or unreadable.

    Records are written atomically, so one that does not parse (truncated by a full disk, edited by
    hand) is never trusted: with ``repair`` it is moved aside (:func:`harness.files.quarantine`: kept
    for inspection within a bound) and logged, so the cell is recomputed; without it (dry runs,
    status views) it is only logged. Whether a record that parses can be trusted is
    :func:`harness.integrity.verify_record`'s question.
    """
    if not path.is_file():
        return None
    try:
        with path.open(encoding="utf-8") as fh:
            record = json.load(fh)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        return record
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        if repair:
            quarantine(path, f"unreadable record ({exc}); the cell is recomputed")
        else:
            log.warning("unreadable record %s (%s); the cell counts as missing", path, exc)
        return None


def git_state(where: Path | None = None) -> dict[str, Any]:
    """Git sha and dirty flag (tracked files changed) of the repository holding ``where`` (default: the
    svdbench source tree); None for both outside a checkout or when git does not answer in 10 s."""
    root = where if where is not None else Path(__file__).resolve().parent.parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, check=True,
                                  timeout=10).stdout.strip()

        return {"git_sha": git("rev-parse", "HEAD"), "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return {"git_sha": None, "git_dirty": None}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def provenance(device: torch.device, dtype: str, seed: int) -> dict[str, Any]:
    """Versions, git state, device and seed of this process (the record's ``provenance``)."""
    import transformers

    prov: dict[str, Any] = {
        "svdbench_version": svdbench_version(),
        **git_state(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "device": device_name(device),
        "dtype": dtype,
        "seed": seed,
    }
    for pkg in ("lm_eval", "datasets"):
        try:
            from importlib import metadata

            prov[pkg] = metadata.version(pkg.replace("_", "-") if pkg == "lm_eval" else pkg)
        except Exception:  # optional packages: absence is recorded, not an error
            prov[pkg] = None
    return prov


def peak_memory_bytes(device: torch.device) -> dict[str, Any]:
    """Peak device memory (CUDA allocator) or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated"}
    import resource

    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "kind": "cpu_max_rss"}


# -- the record builders: every record dictionary is made here --------------------------------------
def record_header(key: str, model: Mapping[str, Any], limit: int | None, prov: Mapping[str, Any],
                  method: Mapping[str, Any], ratio: float, calibration: Mapping[str, Any] | None,
                  key_fields: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fields every record has, whatever its status (a cell that failed before compressing too).

    ``key_fields`` are the fields ``key`` hashes (:func:`run_key`); a record that carries them can be
    checked against its key (:mod:`harness.integrity`).
    """
    return {
        "schema_version": SCHEMA_VERSION, "run_key": key,
        **({"key_fields": dict(key_fields)} if key_fields is not None else {}),
        "status": "ok", "error": None,
        "model": dict(model), "limit": limit, "provenance": dict(prov),
        "method": dict(method), "ratio": ratio, "calibration": None if calibration is None else dict(calibration),
    }


def failed_record(header: Mapping[str, Any], error: str) -> dict[str, Any]:
    """A failed cell: its header, ``status: failed`` and the traceback."""
    return {**header, "status": "failed", "error": error}


def dense_record(header: Mapping[str, Any], params_targets: int, params_model: int, metrics: Mapping[str, Any],
                 evaluation: Mapping[str, Any], timings_s: Mapping[str, float], peak_bytes: int) -> dict[str, Any]:
    """The dense model's record: nothing removed, its metrics, the same fields as a compressed cell."""
    return {
        **header,
        "achieved_ratio": 0.0, "achieved_ratio_model": 0.0,
        "params_dense": params_targets, "params_compressed": params_targets,
        "params_model_dense": params_model, "params_model_compressed": params_model,
        "metrics": dict(metrics), "evaluation": dict(evaluation), "timings_s": dict(timings_s),
        "peak_memory_bytes": peak_bytes, "numerics": {}, "layers": [],
    }


def cell_record(header: Mapping[str, Any], counts: Mapping[str, Any], metrics: Mapping[str, Any],
                evaluation: Mapping[str, Any], timings_s: Mapping[str, float], statistics_cached: bool,
                statistics: Mapping[str, Any], probes: Mapping[str, Any], peak_bytes: int,
                numerics: Mapping[str, Any], layers: list[dict[str, Any]],
                compression: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A compressed cell's record.

    Args:
        header: :func:`record_header`.
        counts: Parameter counts and achieved ratios (:meth:`CompressionResult.counts`).
        metrics: ``{evaluation: result}``.
        evaluation: Where the model ran (``placement``) and the evaluation options when set.
        timings_s: Seconds per stage (load, statistics, allocation, factorization, compress, eval).
        statistics_cached: True when no dense statistics pass ran for this cell.
        statistics: What the engine collected (keys, shared inputs, Gram product, SVD driver).
        probes: Engine measurements the allocator ran (forwards, seconds, cache hit).
        peak_bytes: Peak device (or process) memory.
        numerics: Whitening fallbacks and other numerical facts.
        layers: One entry per target linear (rank, keep, reported statistics).
        compression: The compression key and where the compressed model came from (computed in this
            process, or installed from a store of compressions), or None.
    """
    return {
        **header, **counts,
        "metrics": dict(metrics), "evaluation": dict(evaluation), "timings_s": dict(timings_s),
        "statistics_cached": statistics_cached, "statistics": dict(statistics), "probes": dict(probes),
        "peak_memory_bytes": peak_bytes, "numerics": dict(numerics), "layers": layers,
        **({"compression": dict(compression)} if compression is not None else {}),
    }
