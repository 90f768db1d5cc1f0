"""The on-disk statistics store: one safetensors file per decoder block, an index with a checksum per file.

Layout: ``<cache>/stats/<identity key>/<statistic slug>/block-00007.safetensors`` plus ``index.json``.
The identity key hashes the model weights, dtype and calibration tokens; each dense-stream statistic
(:mod:`methods.statistics`) has its own sub-directory, so a method that declares a new statistic
computes only that one and reuses the rest. Tensor names inside a block file are
``<representative module>::<result name>`` for linear-input statistics (one entry per group of
linears that share an input) and ``block::<result name>`` for block-scope ones.

Files are written through a temporary name and renamed; the index is written last, so an interrupted
pass leaves no index and is recomputed. Every file is verified on read against the CRC-32 and size
recorded in the index: a truncated or corrupted file raises :class:`CorruptStoreError`, and the
caller moves the statistic's directory aside (renamed, never deleted) and recomputes it. A warm run
memory-maps one block file at a time.

Disk: float64 by default (``SVDBENCH_STATS_DTYPE=float32`` halves it, at float32 rounding of the
Grams): about 1.2 GB per Llama-2-7B block (three Grams), 40 GB for the model.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from harness.cache import move_aside, write_text_atomic

log = logging.getLogger(__name__)

STORE_VERSION = 2
DTYPE_ENV = "SVDBENCH_STATS_DTYPE"
BLOCK_PREFIX = "block"


class CorruptStoreError(RuntimeError):
    """A stored statistics file is missing, truncated or fails its checksum."""

    def __init__(self, directory: Path, reason: str) -> None:
        super().__init__(f"statistics store {directory} is corrupt: {reason}")
        self.directory, self.reason = directory, reason


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", key)


def crc32_file(path: Path) -> int:
    """CRC-32 of a file through a memory map (no Python-level copy)."""
    with path.open("rb") as fh:
        if os.fstat(fh.fileno()).st_size == 0:
            return 0
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            return zlib.crc32(mm)


def storage_dtype() -> torch.dtype:
    name = os.environ.get(DTYPE_ENV, "float64")
    if name not in {"float64", "float32"}:
        raise ValueError(f"{DTYPE_ENV} must be float64 or float32, got {name!r}")
    return getattr(torch, name)


@dataclass
class StatisticDir:
    """One statistic's sub-directory of the store."""

    path: Path
    key: str
    index: dict[str, Any] | None = None

    @property
    def index_path(self) -> Path:
        return self.path / "index.json"

    def load_index(self, n_blocks: int) -> dict[str, Any] | None:
        """The index when the statistic is complete (every file present at its recorded size), else None.

        Raises:
            CorruptStoreError: when an index exists but does not parse or names a file that is missing
                or of the wrong size (truncated).
        """
        if not self.index_path.is_file():
            return None
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
            files = index["blocks"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptStoreError(self.path, f"unreadable index ({exc})") from exc
        if index.get("version") != STORE_VERSION or index.get("statistic") != self.key or len(files) != n_blocks:
            return None
        for entry in files:
            f = self.path / entry["file"]
            if not f.is_file() or f.stat().st_size != entry["bytes"]:
                raise CorruptStoreError(self.path, f"{entry['file']} is missing or truncated")
        self.index = index
        return index


@dataclass
class StoreWriter:
    """Writes one statistic block by block; the index is written by :meth:`finish`."""

    directory: StatisticDir
    dtype: torch.dtype
    blocks: list[dict[str, Any]] = field(default_factory=list)
    block_values: list[dict[str, float]] = field(default_factory=list)

    def write(self, index: int, tensors: dict[str, Tensor], groups: list[list[str]], values: dict[str, float]) -> None:
        """Save block ``index`` (tensors leave the device here, once per block)."""
        if index != len(self.blocks):
            raise ValueError(f"blocks must be written in order: got {index}, expected {len(self.blocks)}")
        path = self.directory.path
        path.mkdir(parents=True, exist_ok=True)
        name = f"{BLOCK_PREFIX}-{index:05d}.safetensors"
        host = {k: (v.to(self.dtype) if v.is_floating_point() else v).contiguous().cpu() for k, v in tensors.items()}
        fd, tmp = tempfile.mkstemp(dir=path, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            save_file(host, tmp)
            os.replace(tmp, path / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.blocks.append({"file": name, "bytes": (path / name).stat().st_size, "crc32": crc32_file(path / name),
                            "groups": groups})
        self.block_values.append(values)

    def finish(self, meta: dict[str, Any]) -> None:
        index = {"version": STORE_VERSION, "statistic": self.directory.key, "dtype": str(self.dtype).removeprefix("torch."),
                 "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "blocks": self.blocks,
                 "block_values": self.block_values, **meta}
        write_text_atomic(self.directory.index_path, json.dumps(index, indent=1))
        self.directory.index = index


class StatsStore:
    """Statistics of one (model weights, dtype, calibration) identity (module docstring).

    Args:
        root: The identity's directory.
        n_blocks: Number of decoder blocks (an index for another count is ignored).
    """

    def __init__(self, root: Path, n_blocks: int) -> None:
        self.root, self.n_blocks = root, n_blocks
        self._dirs: dict[str, StatisticDir] = {}

    def directory(self, key: str) -> StatisticDir:
        if key not in self._dirs:
            self._dirs[key] = StatisticDir(self.root / _slug(key), key)
        return self._dirs[key]

    def complete(self, key: str) -> bool:
        """True when ``key`` is stored completely; a corrupt index or truncated file is moved aside first."""
        d = self.directory(key)
        try:
            return d.load_index(self.n_blocks) is not None
        except CorruptStoreError as exc:
            self.discard(exc)
            return False

    def writer(self, key: str) -> StoreWriter:
        d = self.directory(key)
        if d.path.exists():  # an interrupted pass: no index, partial files
            move_aside(d.path, "incomplete statistics (no index)")
        return StoreWriter(d, storage_dtype())

    def block_values(self, key: str) -> list[dict[str, float]]:
        index = self.directory(key).index
        if index is None:
            raise RuntimeError(f"statistic {key!r} is not stored")
        return index["block_values"]

    def groups(self, key: str, block: int) -> list[list[str]]:
        return self.directory(key).index["blocks"][block]["groups"]  # type: ignore[index]

    def read(self, key: str, block: int, device: torch.device) -> dict[str, Tensor]:
        """Block ``block`` of statistic ``key``, verified, on ``device`` (floating tensors as float64).

        Raises:
            CorruptStoreError: on a checksum or size mismatch.
        """
        d = self.directory(key)
        if d.index is None:
            raise RuntimeError(f"statistic {key!r} is not stored")
        entry = d.index["blocks"][block]
        path = d.path / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["bytes"]:
            raise CorruptStoreError(d.path, f"{entry['file']} is missing or truncated")
        if crc32_file(path) != entry["crc32"]:
            raise CorruptStoreError(d.path, f"{entry['file']} fails its CRC-32 checksum")
        out: dict[str, Tensor] = {}
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    t = fh.get_tensor(name)
                    out[name] = t.double() if t.is_floating_point() else t
        except Exception as exc:  # the header itself may be damaged
            raise CorruptStoreError(d.path, f"{entry['file']} does not parse ({exc})") from exc
        return out

    def discard(self, error: CorruptStoreError) -> None:
        """Move a corrupt statistic aside (renamed, never deleted) so it is recomputed."""
        for d in self._dirs.values():
            if d.path == error.directory:
                d.index = None
        if error.directory.exists():
            move_aside(error.directory, error.reason)
