"""On-disk caches (statistics, sensitivity tables, reference models) under one root.

Root: ``$SVDBENCH_CACHE`` if set, else ``~/.cache/svdbench``. Entries are written to a temporary
file and renamed, so a killed process never leaves a truncated entry that later looks valid.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from harness.stats import DenseStats
from methods import LinearStats

log = logging.getLogger(__name__)
STATS_VERSION = 1


def cache_root() -> Path:
    root = os.environ.get("SVDBENCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "svdbench"


def cache_path(kind: str, key: str, suffix: str = ".pt") -> Path:
    return cache_root() / kind / f"{key}{suffix}"


def save_tensor_dict(path: Path, obj: Any) -> None:
    """``torch.save`` through a temporary file in the same directory, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_dense_stats(path: Path, stats: DenseStats) -> None:
    save_tensor_dict(path, {
        "version": STATS_VERSION,
        "grams": {name: (s.gram, s.tokens) for name, s in stats.linear.items()},
        "block_cosine": stats.block_cosine,
        "tokens": stats.tokens,
    })


def load_dense_stats(path: Path) -> DenseStats | None:
    """The cached statistics at ``path``, or None when absent or from another cache version."""
    if not path.is_file():
        return None
    blob = torch.load(path, weights_only=True)
    if blob.get("version") != STATS_VERSION:
        return None
    linear = {name: LinearStats(gram, tokens) for name, (gram, tokens) in blob["grams"].items()}
    log.info("statistics loaded from cache %s", path)
    return DenseStats(linear, list(blob["block_cosine"]), int(blob["tokens"]))
