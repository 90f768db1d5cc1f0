"""Stored compressions: compress a cell once, evaluate it as often as later runs ask.

A cell's compression is identified by what determines it alone (model, dtype, method and its
config, ratio, calibration, SVD routine: :func:`harness.runs.config.compression_key_fields`),
separately from the evaluations that score it. With a store (``--compressed-store DIR``, or
``compressed_store`` in a sweep spec), a run that compresses a cell also writes the compressed
modules there, and a later run that asks for another evaluation of the same cell installs them into
its dense model instead of recomputing statistics, probes and factors. Without a store, nothing
changes.

An entry ``<store>/<compression key>/`` holds

* ``modules.safetensors``: the tensors of the replaced modules only (the factors; every other
  tensor of the model is the base model's own, which the key names), each stored once (a shared
  basis is one tensor for its whole group: the other members are ``tied`` aliases);
* ``compression.json``: checked JSON (:func:`harness.cache.write_checked_json`) with the format
  version, the compression key and its fields, the module specs (class, shapes, rank), the tied
  aliases, the SHA-256 and size of the weights file, and what the cell's records say about its
  compression (counts, layers, statistics, numerics, probe costs and the original timings).

Entries are written under a temporary name and renamed into place, so a reader sees a complete
entry or none; when two processes store the same key at once, the first rename wins and the other
discards its copy (both are the same compression). Runs that share a store claim a compression
before computing it (:meth:`harness.runs.session.Session.compression_claim`, :mod:`harness.work_claims`),
so the second waits and installs the first one's entry instead of computing it again; the entry's
files follow the umask (:func:`harness.files.follow_umask`). Installing checks the weights file's size and
SHA-256 against the manifest and the module shapes against the model, and refuses with
:class:`StoredCompressionError` naming the problem. Each use touches ``last_used``, which
:meth:`CompressionStore.prune` uses to evict the least recently used entries under a size bound.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from harness.cache import read_checked_json, write_checked_json
from harness.engine.models import set_module
from harness.export import ExportError, build_module, module_specs, sha256_file, unique_tensors
from harness.files import follow_umask

__all__ = ["CompressionStore", "StoredCompressionError", "StoredEntry"]

log = logging.getLogger(__name__)

FORMAT = "svdbench-compression"
FORMAT_VERSION = 1
MANIFEST = "compression.json"
WEIGHTS = "modules.safetensors"
LAST_USED = "last_used"


class StoredCompressionError(ValueError):
    """A stored compression that cannot be written or installed (damaged, edited, of another model)."""


@dataclass(frozen=True)
class StoredEntry:
    """One entry of a store, as :meth:`CompressionStore.entries` lists it."""

    key: str
    path: Path
    bytes: int
    created: float
    last_used: float
    model: str | None
    method: str | None
    ratio: float | None
    seed: int | None


class CompressionStore:
    """A folder of stored compressions (module docstring).

    Args:
        root: The store folder (created on first write).
        max_bytes: After each write, evict least recently used entries until the store holds at
            most this many bytes (never the entry just written); None: unbounded.
    """

    def __init__(self, root: Path | str, max_bytes: int | None = None) -> None:
        self.root = Path(root).expanduser()
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"a store bound must be a non-negative number of bytes, got {max_bytes}")
        self.max_bytes = max_bytes

    def path(self, key: str) -> Path:
        return self.root / key

    def manifest(self, key: str) -> dict[str, Any] | None:
        """The entry's manifest, or None when there is no complete, readable entry for ``key``."""
        entry = self.path(key)
        payload = read_checked_json(entry / MANIFEST) if (entry / MANIFEST).is_file() else None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("key") != key:
            return None
        if payload.get("format_version") != FORMAT_VERSION:
            log.warning("%s: format version %r, this svdbench reads %d; recomputing", entry,
                        payload.get("format_version"), FORMAT_VERSION)
            return None
        weights = entry / WEIGHTS
        if not weights.is_file() or weights.stat().st_size != payload["weights"]["bytes"]:
            log.warning("%s: %s is missing or has the wrong size; recomputing", entry, WEIGHTS)
            return None
        return payload

    def has(self, key: str) -> bool:
        """Whether a complete entry for ``key`` exists (sizes checked; checksums on install)."""
        return self.manifest(key) is not None

    # -- writing ------------------------------------------------------------------------------
    def save(self, key: str, model: nn.Module, names: Iterable[str], fields: Mapping[str, Any],
             record: Mapping[str, Any]) -> Path:
        """Store the replaced modules ``names`` of the compressed ``model`` under ``key``.

        Args:
            key: The compression key.
            model: The model, compressed right now.
            names: Dotted names of the modules the compression replaced.
            fields: The compression key's fields (what the key hashes).
            record: What records of this cell say about the compression (counts, layers, ...).

        Returns:
            The entry's folder (another process's, when it stored the same key first).

        Raises:
            StoredCompressionError: when a replaced module is of a type the store cannot rebuild.
        """
        from safetensors.torch import save_file

        names = list(names)
        target = self.path(key)
        if self.has(key):
            return target
        try:
            specs = {name: spec for name, spec in module_specs(model).items() if name in set(names)}
        except ExportError as exc:
            raise StoredCompressionError(str(exc)) from exc
        missing = [n for n in names if n not in specs]
        if missing:
            raise StoredCompressionError(f"cannot store modules of unknown type: {missing[:3]}")
        named = ((f"{name}.{k}", t) for name in names for k, t in model.get_submodule(name).state_dict().items())
        tensors, tied = unique_tensors(named)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".{key}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
            weights = {"bytes": (tmp / WEIGHTS).stat().st_size, "sha256": sha256_file(tmp / WEIGHTS)}
            write_checked_json(tmp / MANIFEST, {
                "format": FORMAT, "format_version": FORMAT_VERSION, "key": key, "fields": dict(fields),
                "modules": specs, "tied": tied, "weights": weights, "record": dict(record),
                "created": time.time(),
            })
            (tmp / LAST_USED).touch()
            follow_umask(tmp)
            try:
                os.rename(tmp, target)  # atomic; fails when another process stored the key first
            except OSError:
                if not self.has(key):
                    raise
                log.info("compression %s was stored by another process; keeping that copy", key)
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("stored compression %s (%.1f MB) in %s", key, weights["bytes"] / 1e6, self.root)
        if self.max_bytes is not None:
            self.prune(max_bytes=self.max_bytes, keep=(key,))
        return target

    # -- reading ------------------------------------------------------------------------------
    def install(self, key: str, model: nn.Module) -> tuple[dict[str, Any], list[tuple[str, nn.Module]]]:
        """Swap the stored modules of ``key`` into the dense ``model``.

        Each module is built at its recorded shape on the device and in the dtype of the module it
        replaces, and the stored tensors are copied in; the replaced modules are returned so that
        :func:`harness.engine.compress.restore` can put them back.

        Returns:
            ``(manifest, undo)``: undo is ``[(name, original module), ...]`` in install order.

        Raises:
            StoredCompressionError: no such entry, a weights file that fails its checksum, or modules
                that do not fit ``model``.
        """
        from safetensors.torch import load_file

        manifest = self.manifest(key)
        entry = self.path(key)
        if manifest is None:
            raise StoredCompressionError(f"no complete stored compression {key} in {self.root}")
        if sha256_file(entry / WEIGHTS) != manifest["weights"]["sha256"]:
            raise StoredCompressionError(f"{entry / WEIGHTS} does not match its SHA-256 (damaged or edited)")
        state = load_file(str(entry / WEIGHTS))
        for alias, source in (manifest.get("tied") or {}).items():
            state[alias] = state[source]
        built: list[tuple[str, nn.Module]] = []
        for name, spec in manifest["modules"].items():
            try:
                old = model.get_submodule(name)
            except AttributeError as exc:
                raise StoredCompressionError(f"{entry}: the model has no module {name!r}") from exc
            weight = getattr(old, "weight", None)
            if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (spec["in_features"], spec["out_features"]):
                raise StoredCompressionError(f"{entry}: module {name} of the model is not a dense linear of "
                                             f"{spec['in_features']} -> {spec['out_features']}")
            try:
                new = build_module(spec, device=weight.device, dtype=weight.dtype)
            except ExportError as exc:
                raise StoredCompressionError(f"{entry}: {exc}") from exc
            own = {k: state[f"{name}.{k}"] for k in new.state_dict() if f"{name}.{k}" in state}
            try:
                new.load_state_dict(own, strict=True)
            except RuntimeError as exc:
                raise StoredCompressionError(f"{entry}: stored tensors do not fit module {name}: {exc}") from exc
            built.append((name, new))
        _share_tied(built, manifest.get("tied") or {})
        undo = [(name, set_module(model, name, new)) for name, new in built]
        (entry / LAST_USED).touch()
        return manifest, undo

    # -- listing and pruning ------------------------------------------------------------------
    def entries(self) -> list[StoredEntry]:
        """Complete entries, most recently used first."""
        out = []
        if not self.root.is_dir():
            return out
        for entry in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            manifest = self.manifest(entry.name)
            if manifest is None:
                continue
            fields = manifest.get("fields") or {}
            calibration = fields.get("calibration") or {}
            used = entry / LAST_USED
            out.append(StoredEntry(
                entry.name, entry, sum(p.stat().st_size for p in entry.iterdir() if p.is_file()),
                float(manifest.get("created", 0.0)), used.stat().st_mtime if used.exists() else 0.0,
                (fields.get("model") or {}).get("id"), (fields.get("method") or {}).get("name"),
                fields.get("ratio"), calibration.get("seed"),
            ))
        return sorted(out, key=lambda e: e.last_used, reverse=True)

    def prune(self, keys: Iterable[str] = (), max_bytes: int | None = None, older_than_s: float | None = None,
              everything: bool = False, keep: Iterable[str] = ()) -> list[StoredEntry]:
        """Remove entries: the named ``keys``, those unused for ``older_than_s`` seconds, everything,
        and then the least recently used until the store holds at most ``max_bytes``. Unfinished
        temporary folders of dead writers older than a day go too.

        Returns:
            The removed entries.
        """
        keys, keep = set(keys), set(keep)
        now = time.time()
        entries = self.entries()
        doomed = [e for e in entries if e.key not in keep and (
            everything or e.key in keys or (older_than_s is not None and now - e.last_used > older_than_s))]
        unknown = keys - {e.key for e in entries}
        if unknown:
            raise StoredCompressionError(f"no stored compression {', '.join(sorted(unknown))} in {self.root}")
        if max_bytes is not None:
            left = [e for e in entries if e not in doomed]
            total = sum(e.bytes for e in left)
            for e in reversed(left):  # least recently used first
                if total <= max_bytes:
                    break
                if e.key not in keep:
                    doomed.append(e)
                    total -= e.bytes
        for e in doomed:
            shutil.rmtree(e.path, ignore_errors=True)
            log.info("removed stored compression %s (%.1f MB)", e.key, e.bytes / 1e6)
        if self.root.is_dir():
            for tmp in self.root.glob(".*.tmp-*"):
                if now - tmp.stat().st_mtime > 86400:
                    shutil.rmtree(tmp, ignore_errors=True)
        return doomed


def _share_tied(built: list[tuple[str, nn.Module]], tied: Mapping[str, str]) -> None:
    """Make tied tensors one tensor again (a shared basis is one parameter of its whole group)."""
    if not tied:
        return
    modules = dict(built)

    def locate(dotted: str) -> tuple[nn.Module, str]:
        for name, module in modules.items():
            if dotted.startswith(name + "."):
                owner, _, leaf = dotted[len(name) + 1:].rpartition(".")
                return (module.get_submodule(owner) if owner else module), leaf
        raise StoredCompressionError(f"tied tensor {dotted!r} belongs to no stored module")

    for alias, source in tied.items():
        (src_owner, src_leaf), (dst_owner, dst_leaf) = locate(source), locate(alias)
        value = getattr(src_owner, src_leaf)
        if isinstance(value, nn.Parameter):
            dst_owner._parameters[dst_leaf] = value
        else:
            dst_owner._buffers[dst_leaf] = value


def describe(entries: list[StoredEntry]) -> str:
    """A plain table of entries for ``svdbench compressions list``."""
    if not entries:
        return "no stored compressions"
    rows = [f"{'key':20} {'model':28} {'method':40} {'ratio':>5} {'seed':>4} {'MB':>8}  last used"]
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used)) if e.last_used else "-"
        rows.append(f"{e.key:20} {str(e.model)[:28]:28} {str(e.method)[:40]:40} {e.ratio if e.ratio is not None else '-':>5} "
                    f"{e.seed if e.seed is not None else '-':>4} {e.bytes / 1e6:8.1f}  {used}")
    rows.append(f"{len(entries)} entries, {sum(e.bytes for e in entries) / 1e6:.1f} MB")
    return "\n".join(rows)


def to_json(entries: list[StoredEntry]) -> str:
    """The entries as JSON (``svdbench compressions list --json``)."""
    return json.dumps([{**e.__dict__, "path": str(e.path)} for e in entries], indent=1)
