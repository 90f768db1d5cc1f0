"""On-disk caches (statistics, sensitivity tables, reference and packaged models) under one root.

Root: ``$SVDBENCH_CACHE`` if set, else ``~/.cache/svdbench``. Entries are written to a temporary
file and renamed, so a killed process never leaves a truncated entry that later looks valid. What
fails verification on read is moved aside (renamed with a ``.corrupt-<time>`` suffix; the newest
few per folder are kept for inspection, :func:`harness.files.quarantine`), logged, and recomputed. Nothing is read with pickle: tensors are
stored as safetensors, everything else as JSON.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from harness.files import quarantine, write_text_atomic

log = logging.getLogger(__name__)


def cache_root() -> Path:
    root = os.environ.get("SVDBENCH_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "svdbench"


def cache_path(kind: str, key: str, suffix: str = "") -> Path:
    return cache_root() / kind / f"{key}{suffix}"


def file_sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def directory_manifest(directory: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{file name: sha256}`` of the regular files directly inside ``directory``."""
    return {p.name: file_sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name not in exclude}


def manifest_mismatches(directory: Path, files: dict[str, str]) -> list[str]:
    """Names of the manifest's files that are missing or whose SHA-256 differs."""
    return [name for name, digest in files.items()
            if not (directory / name).is_file() or file_sha256(directory / name) != digest]


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def write_checked_json(path: Path, payload: Any) -> None:
    """JSON with a SHA-256 of its canonical payload, written atomically (read with :func:`read_checked_json`)."""
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    write_text_atomic(path, json.dumps({"sha256": sha256_text(body), "payload": payload}, sort_keys=True))


def read_checked_json(path: Path) -> Any | None:
    """The payload at ``path``; None when absent. A file that does not parse or fails its checksum is
    moved aside (and None returned), so the caller recomputes it."""
    if not path.is_file():
        return None
    try:
        blob = json.loads(path.read_text(encoding="utf-8"))
        body = json.dumps(blob["payload"], sort_keys=True, separators=(",", ":"))
        ok = blob["sha256"] == sha256_text(body)
    except (OSError, ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        quarantine(path, "unreadable or failed its checksum")
        return None
    return blob["payload"]
