"""The on-disk statistics store: one safetensors file per decoder block, an index with a checksum per file.

Layout: ``<cache>/stats/<identity key>/<statistic slug>/block-00007.safetensors`` plus ``index.json``.
The identity key hashes the model weights, dtype and calibration tokens; each dense-stream statistic
(:mod:`methods.statistics`) has its own sub-directory, so a method that declares a new statistic
computes only that one and reuses the rest. Tensor names inside a block file are
``<representative module>::<result name>`` for linear-input statistics (one entry per group of
linears that share an input) and ``block::<result name>`` for block-scope ones.

A statistic is written into a private staging folder (``.<slug>.tmp-<host>-<pid>-<random>``) with
its index last, then renamed into place: its directory exists only complete, and when two processes
write one statistic the first rename wins and the other discards its copy. Processes that share the
cache coordinate through claims (:mod:`harness.work_claims`): the first to find a statistic missing claims
it and computes it; the others wait for it (a process that already holds a claim computes instead of
waiting, so two processes can never wait for each other), and recover the claim of an owner that
died. Staging folders of dead writers are removed by the next claimant. Every file is verified on
read against the CRC-32 and size recorded in the index: a truncated or corrupted file raises
:class:`CorruptStoreError`, and the caller moves the statistic's directory aside (a bounded
quarantine, :func:`harness.files.quarantine`) and recomputes it. A warm run memory-maps one block
file at a time.

Disk: float64 by default (``SVDBENCH_STATS_DTYPE=float32`` halves it, at float32 rounding of the
Grams): about 1.2 GB per Llama-2-7B block (three Grams), 40 GB for the model.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import re
import shutil
import socket
import tempfile
import time
import uuid
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from harness.files import follow_umask, quarantine, write_text_atomic
from harness.work_claims import Claim, try_claim, wait_for

log = logging.getLogger(__name__)

STORE_VERSION = 2
DTYPE_ENV = "SVDBENCH_STATS_DTYPE"
BLOCK_PREFIX = "block"
STAGING_MAX_AGE_S = 86400.0  # another host's staging folder untouched this long belongs to a dead writer


class CorruptStoreError(RuntimeError):
    """A stored statistics file is missing, truncated or fails its checksum.

    ``stamp`` identifies the index that was found corrupt, so that a process never moves aside a
    directory another process has meanwhile replaced with a good one.
    """

    def __init__(self, directory: Path, reason: str, stamp: tuple[int, int] | None = None) -> None:
        super().__init__(f"statistics store {directory} is corrupt: {reason}")
        self.directory, self.reason, self.stamp = directory, reason, stamp


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


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
    stamp: tuple[int, int] | None = None  # of the index file that ``index`` was read from

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
        stamp = _stamp(self.index_path)
        try:
            index = json.loads(self.index_path.read_text(encoding="utf-8"))
            files = index["blocks"]
        except FileNotFoundError:
            return None  # moved aside by another process meanwhile
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CorruptStoreError(self.path, f"unreadable index ({exc})", stamp) from exc
        if index.get("version") != STORE_VERSION or index.get("statistic") != self.key or len(files) != n_blocks:
            return None
        for entry in files:
            f = self.path / entry["file"]
            if not f.is_file() or f.stat().st_size != entry["bytes"]:
                raise CorruptStoreError(self.path, f"{entry['file']} is missing or truncated", stamp)
        self.index, self.stamp = index, stamp
        return index


def _abandon(staging: Path, claim: Claim | None) -> None:
    """Clean up after a writer that never finished (its pass failed): its staging folder and claim."""
    if staging.exists():
        shutil.rmtree(staging, ignore_errors=True)
        log.info("removed the unfinished statistics staging folder %s", staging)
    if claim is not None:
        claim.release()


@dataclass(eq=False)
class StoreWriter:
    """Writes one statistic block by block into a staging folder; :meth:`finish` writes the index and
    renames the folder into place. A writer dropped unfinished removes its staging folder and
    releases its claim."""

    directory: StatisticDir
    dtype: torch.dtype
    blocks: list[dict[str, Any]] = field(default_factory=list)
    block_values: list[dict[str, float]] = field(default_factory=list)
    staging: Path | None = None
    claim: Claim | None = None

    def __post_init__(self) -> None:
        if self.staging is None:
            d = self.directory.path
            self.staging = d.with_name(f".{d.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._cleanup = weakref.finalize(self, _abandon, self.staging, self.claim)

    def abandon(self) -> None:
        """Give up: remove the staging folder and release the claim (idempotent)."""
        self._cleanup()

    def write(self, index: int, tensors: dict[str, Tensor], groups: list[list[str]], values: dict[str, float]) -> None:
        """Save block ``index`` (tensors leave the device here, once per block)."""
        if index != len(self.blocks):
            raise ValueError(f"blocks must be written in order: got {index}, expected {len(self.blocks)}")
        assert self.staging is not None
        path = self.staging
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
        """Write the index into the staging folder and rename it into place (first writer wins)."""
        assert self.staging is not None
        d = self.directory
        index = {"version": STORE_VERSION, "statistic": d.key, "dtype": str(self.dtype).removeprefix("torch."),
                 "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "blocks": self.blocks,
                 "block_values": self.block_values, **meta}
        write_text_atomic(self.staging / "index.json", json.dumps(index, indent=1))
        follow_umask(self.staging)
        n_blocks = len(self.blocks)
        for _ in range(3):
            try:
                os.rename(self.staging, d.path)  # fails when the directory exists (and is not empty)
                d.index, d.stamp = index, _stamp(d.index_path)
                log.info("stored statistic %s (%d blocks) in %s", d.key, n_blocks, d.path)
                break
            except OSError:
                try:
                    if d.load_index(n_blocks) is not None:
                        log.info("statistic %s was stored by another process first; keeping that copy", d.key)
                        break
                except CorruptStoreError as exc:
                    log.warning("%s", exc)
                if d.path.exists():  # a directory without a (valid) index: an old interrupted pass
                    quarantine(d.path, "incomplete statistics (no valid index) in the way of a finished one")
        else:
            raise OSError(f"could not move the statistic {d.key} from {self.staging} to {d.path}")
        self.abandon()  # the staging folder is gone (renamed) or redundant; the claim is released


class StatsStore:
    """Statistics of one (model weights, dtype, calibration) identity (module docstring).

    Args:
        root: The identity's directory.
        n_blocks: Number of decoder blocks (an index for another count is ignored).
    """

    def __init__(self, root: Path, n_blocks: int) -> None:
        self.root, self.n_blocks = root, n_blocks
        self._dirs: dict[str, StatisticDir] = {}
        self._claims: dict[str, Claim] = {}  # statistics this process has claimed to compute

    def directory(self, key: str) -> StatisticDir:
        if key not in self._dirs:
            self._dirs[key] = StatisticDir(self.root / _slug(key), key)
        return self._dirs[key]

    def _stored(self, key: str) -> bool:
        try:
            return self.directory(key).load_index(self.n_blocks) is not None
        except CorruptStoreError as exc:
            self.discard(exc)
            return False

    def complete(self, key: str) -> bool:
        """True when ``key`` is stored completely (a corrupt index or truncated file is moved aside first).

        When it is not, this process claims it (and must compute it: :meth:`writer`); while another live
        process computes it, this waits for it and returns True once it is stored. A process that holds
        claims already computes without waiting, so two processes never wait for each other.
        """
        d = self.directory(key)
        if self._stored(key):
            return True
        if key in self._claims:
            return False
        what = f"statistic {key} of {self.root.name}"
        self.root.mkdir(parents=True, exist_ok=True)
        got = try_claim(d.path, what)
        if isinstance(got, Claim):
            if self._stored(key):  # finished by another process between the look and the claim
                got.release()
                return True
            self._claims[key] = got
            return False
        if self._claims or got.mine:
            log.info("%s is being computed by %s; computing it here too (%s)", what, got.describe(),
                     "another store of this process holds it" if got.mine else "this process holds other claims")
            return False
        claim = wait_for(d.path, lambda: self._stored(key), what)
        if claim is None:
            return True
        self._claims[key] = claim
        return False

    def writer(self, key: str) -> StoreWriter:
        """A writer of ``key`` (claimed here unless :meth:`complete` has claimed it already)."""
        d = self.directory(key)
        self.root.mkdir(parents=True, exist_ok=True)
        claim = self._claims.pop(key, None)
        if claim is None:
            got = try_claim(d.path, f"statistic {key} of {self.root.name}")
            claim = got if isinstance(got, Claim) else None
        if claim is not None:
            self._clean_staging(d.path)
            if d.path.exists() and not self._stored(key):
                quarantine(d.path, "incomplete statistics (no index)")  # left by an svdbench without staging
        return StoreWriter(d, storage_dtype(), claim=claim)

    def _clean_staging(self, path: Path) -> None:
        """Remove the staging folders of ``path``'s writers that died: on this host, a dead pid; on
        another host (whose process cannot be asked), a folder untouched for a day."""
        for tmp in path.parent.glob(f".{path.name}.tmp-*"):
            host, _, rest = tmp.name[len(path.name) + 6:].rpartition("-")[0].rpartition("-")
            try:
                pid, age = int(rest), time.time() - tmp.stat().st_mtime
            except (ValueError, OSError):
                continue
            dead = host == socket.gethostname() and not _alive(pid)
            if dead or (host != socket.gethostname() and age > STAGING_MAX_AGE_S):
                shutil.rmtree(tmp, ignore_errors=True)
                log.warning("removed %s, the staging folder of a statistics writer that %s", tmp,
                            "died" if dead else f"left it untouched for {age / 3600:.0f} h")

    def release_claims(self) -> None:
        """Release the claims of statistics this process claimed but did not compute (a failed cell)."""
        for key, claim in list(self._claims.items()):
            claim.release()
            del self._claims[key]

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
            raise CorruptStoreError(d.path, f"{entry['file']} is missing or truncated", d.stamp)
        if crc32_file(path) != entry["crc32"]:
            raise CorruptStoreError(d.path, f"{entry['file']} fails its CRC-32 checksum", d.stamp)
        out: dict[str, Tensor] = {}
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as fh:
                for name in fh.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    t = fh.get_tensor(name)
                    out[name] = t.double() if t.is_floating_point() else t
        except Exception as exc:  # the header itself may be damaged
            raise CorruptStoreError(d.path, f"{entry['file']} does not parse ({exc})", d.stamp) from exc
        return out

    def discard(self, error: CorruptStoreError) -> None:
        """Move a corrupt statistic aside (a bounded quarantine) so it is recomputed; one that another
        process has replaced since it was found corrupt is left alone (and read again)."""
        for d in self._dirs.values():
            if d.path == error.directory:
                d.index, d.stamp = None, None
        if not error.directory.exists():
            return
        if error.stamp is not None and _stamp(error.directory / "index.json") != error.stamp:
            log.info("%s was replaced since it was found corrupt; reading it again", error.directory)
            return
        quarantine(error.directory, error.reason)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
