"""Preflight of a run's outputs: every folder it will write is checked before any model loads.

A run writes records to its results folder, statistics to the cache, and, when asked, exports and
stored compressions. Each of them is checked here first, so that a read-only folder, a results
path that is a file (or lies under one), or a disk without room fails in a second with a message
that names the folder, instead of after an hour of compute whose results would be lost:

* **writable**: the folder is created if missing, and a temporary file is created in it and removed
  (the only test that a read-only mount or a full inode table cannot fool);
* **room**: a rough estimate of what the run will write there against the free space: the dense
  Gram statistics of the model (``n_blocks x (3 d^2 + d_ff^2)`` values at the store's precision),
  one export or stored compression per cell (at most the dense weights' size), and a few MB of
  records. ``SVDBENCH_PREFLIGHT_SPACE=0`` skips the room check (when the statistics are known to be
  cached, say).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.cache import cache_root
from harness.engine.models import read_config, resolve_model_path, weight_files
from harness.engine.store import storage_dtype

__all__ = ["SPACE_ENV", "OutputError", "check_room", "check_writable", "preflight_outputs", "statistics_bytes"]

log = logging.getLogger(__name__)

SPACE_ENV = "SVDBENCH_PREFLIGHT_SPACE"
RECORD_BYTES = 256 << 10  # a record with its per-layer list, generously
MIN_RESULTS_BYTES = 4 << 20


class OutputError(ValueError):
    """An output folder that cannot be written (or has no room); the message names it."""


def check_writable(folder: Path | str, what: str) -> Path:
    """Create ``folder`` if needed and prove it writable by creating and removing a file in it.

    Args:
        folder: The folder.
        what: What it is for the message (``results folder``, ``cache``, ...).

    Returns:
        The folder.

    Raises:
        OutputError: when it is a file, lies under a file, cannot be created or is not writable.
    """
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise OutputError(f"the {what} {path} is a file, not a folder")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputError(f"the {what} {path} cannot be created: {parent} is a file, not a folder")
            break
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"the {what} {path} cannot be created: {exc.strerror or exc}") from exc
    try:
        fd, probe = tempfile.mkstemp(dir=path, prefix=".svdbench-write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"the {what} {path} is not writable: {exc.strerror or exc}") from exc
    return path


def check_room(folder: Path, needed: int, what: str, detail: str) -> None:
    """Raise :class:`OutputError` when ``folder``'s filesystem has fewer than ``needed`` bytes free."""
    if os.environ.get(SPACE_ENV, "1") in ("0", "off", "false", "no"):
        return
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(f"the {what} {folder} has {free / 1e6:.1f} MB free, but this run needs about "
                          f"{needed / 1e6:.1f} MB there ({detail}); free some space, or set {SPACE_ENV}=0 "
                          "if you know it will fit")


def _config_value(config: Any, *names: str) -> int | None:
    for source in (config, getattr(config, "text_config", None)):
        for name in names:
            value = getattr(source, name, None) if source is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def statistics_bytes(config: Any) -> int:
    """Rough bytes of a model's dense Gram statistics at the store's precision (0 when unknown)."""
    d = _config_value(config, "hidden_size", "d_model", "n_embd")
    blocks = _config_value(config, "num_hidden_layers", "n_layer", "num_layers")
    if d is None or blocks is None:
        return 0
    ff = _config_value(config, "intermediate_size", "ffn_dim", "n_inner") or 4 * d
    return blocks * (3 * d * d + ff * ff) * storage_dtype().itemsize


def _weights_bytes(model: str) -> int:
    path = Path(resolve_model_path(model))
    return sum(p.stat().st_size for p in weight_files(path)) if path.is_dir() else 0


def preflight_outputs(cfg: Any, cells: Sequence[tuple[str, float]]) -> None:
    """Check every output of running ``cells`` of ``cfg`` (:class:`harness.runs.RunConfig`) before
    the model loads (module docstring).

    Raises:
        OutputError: naming the folder that cannot be written or has no room.
    """
    compressed = sum(method != "dense" for method, _ in cells)
    results = check_writable(cfg.results, "results folder")
    check_room(results, max(MIN_RESULTS_BYTES, RECORD_BYTES * len(cells)), "results folder",
               f"{len(cells)} record(s)")
    if not compressed:
        return
    stats = check_writable(cache_root() / "stats", "statistics cache ($SVDBENCH_CACHE)")
    config = read_config(cfg.model)
    check_room(stats, statistics_bytes(config), "statistics cache ($SVDBENCH_CACHE)",
               "the model's dense Gram statistics, unless they are cached already")
    dense = _weights_bytes(cfg.model)
    if cfg.export:
        out = check_writable(cfg.export, "export folder")
        check_room(out, dense, "export folder", "one exported cell, at most the dense weights' size")
    if cfg.compressed_store:
        store = check_writable(cfg.compressed_store, "store of compressions (--compressed-store)")
        check_room(store, dense, "store of compressions", "one compressed cell, at most the dense weights' size")
