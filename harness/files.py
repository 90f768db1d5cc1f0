"""Files svdbench writes for others to read: modes that follow the umask, atomic text writes, and a
bounded quarantine for what failed verification.

* **Modes.** ``tempfile.mkstemp`` and safetensors create their files ``0600``, so records, statistics
  and stored compressions written through a temporary name would be unreadable by the group that
  shares a results folder or a cache, whatever the umask says. Every writer of svdbench gives its
  files ``0666 & ~umask`` through :func:`follow_umask` (directories: ``0777 & ~umask``).
* **Atomic text.** :func:`write_text_atomic` writes a temporary file in the target's directory,
  fsyncs it, sets the umask's mode and renames it over the target: a reader sees the old file or the
  new one, never half of one.
* **Quarantine.** What fails verification (an unreadable or tampered record, a corrupt statistic)
  is renamed ``<name>.corrupt-<time>-<pid>`` by :func:`quarantine`, never overwritten, so that it can
  be inspected; but the quarantined copies of one folder are bounded (the newest
  ``$SVDBENCH_QUARANTINE_KEEP``, default 3, within ``$SVDBENCH_QUARANTINE_MAX_GB``, default 1 GB,
  together): older or larger ones are removed, and logged, so a disk never stays full of them.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

__all__ = [
    "QUARANTINE_KEEP_ENV", "QUARANTINE_MAX_GB_ENV", "current_umask", "follow_umask", "path_bytes",
    "prune_quarantine", "quarantine", "quarantined", "write_text_atomic",
]

log = logging.getLogger(__name__)

QUARANTINE_KEEP_ENV = "SVDBENCH_QUARANTINE_KEEP"
QUARANTINE_MAX_GB_ENV = "SVDBENCH_QUARANTINE_MAX_GB"
_QUARANTINED = re.compile(r"\.corrupt-\d{8}T\d{6}-\d+(?:-\d+)?$")


def current_umask() -> int:
    """This process's umask, read without changing it where Linux allows (``/proc/self/status``):
    setting it to read it back would race with other threads creating files."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path, recursive: bool = True) -> None:
    """Give ``path`` (a file, or a folder and, with ``recursive``, what it holds) the mode the umask
    allows: ``0666 & ~umask`` for files, ``0777 & ~umask`` for folders."""
    mask = current_umask()
    if path.is_dir():
        path.chmod(0o777 & ~mask)
        if recursive:
            for p in path.rglob("*"):
                p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
    else:
        path.chmod(0o666 & ~mask)


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, fsync, give it the umask's mode, rename over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def path_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (0 for what vanished meanwhile)."""
    try:
        if not path.is_dir():
            return path.stat().st_size
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    except OSError:
        return 0


def quarantined(folder: Path) -> list[Path]:
    """The quarantined entries directly in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if _QUARANTINED.search(p.name):
            try:
                found.append((p.lstat().st_mtime, p))
            except FileNotFoundError:
                continue
    return [p for _, p in sorted(found, key=lambda t: t[0], reverse=True)]


def _bound_keep() -> int:
    return max(0, int(os.environ.get(QUARANTINE_KEEP_ENV) or 3))


def _bound_bytes() -> int:
    return int(float(os.environ.get(QUARANTINE_MAX_GB_ENV) or 1.0) * 1e9)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def prune_quarantine(folder: Path, keep: int | None = None, max_bytes: int | None = None) -> list[Path]:
    """Remove the quarantined entries of ``folder`` beyond the newest ``keep`` or beyond ``max_bytes``
    together (defaults: the environment's bounds); returns what was removed (each one logged)."""
    keep = _bound_keep() if keep is None else keep
    max_bytes = _bound_bytes() if max_bytes is None else max_bytes
    removed, total = [], 0
    for i, entry in enumerate(quarantined(folder)):
        size = path_bytes(entry)
        if i < keep and total + size <= max_bytes:
            total += size
            continue
        _remove(entry)
        removed.append(entry)
        why = f"more than {keep} quarantined" if i >= keep else f"over the quarantine bound of {max_bytes / 1e9:g} GB"
        log.warning("removed quarantined %s (%.1f MB): %s in %s", entry.name, size / 1e6, why, folder)
    return removed


def quarantine(path: Path, reason: str) -> Path | None:
    """Move a bad record, statistic or stored compression aside (``<name>.corrupt-<time>-<pid>``) and
    log why, then bound the folder's quarantine (:func:`prune_quarantine`).

    Returns:
        Where it went (None when another process moved or removed it first, or the bound removed it
        at once because it alone is larger than the bound).
    """
    stamp = f"{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}"
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 0
    while target.exists():  # two in one second from one process
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    try:
        path.rename(target)
    except FileNotFoundError:
        log.info("%s was already moved aside or removed by another process", path)
        return None
    log.warning("%s: %s; moved aside to %s", path, reason, target.name)
    prune_quarantine(path.parent)
    return target if target.exists() else None
