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

log = logging.getLogger(__name__)


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
