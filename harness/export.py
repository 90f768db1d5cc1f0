"""Compressed models as shareable directories: write, verify and load them back exactly.

An export directory holds

* ``model.safetensors`` (or ``model-0000i-of-0000n.safetensors`` shards): the compressed model's
  state dict, i.e. the low-rank factors (``<linear>.first.weight: (k, n)``,
  ``<linear>.second.weight: (m, k)`` and the bias), for column-preserving layers also
  ``<linear>.columns.weight`` and the int64 ``kept_idx`` / ``rest_idx`` buffers, and every tensor
  the method left dense (embeddings, norms, head). Tied tensors are stored once;
* the tokenizer files and ``config.json``: the base model's config with ``model_type``,
  ``architectures`` and ``auto_map`` of the remote code and a ``svdbench`` block (base config class
  and architecture, replaced modules, tied names); :func:`harness.remote_code.base_config` reads the
  base config back. Format 1 exports hold the base model's config unchanged;
* ``modeling_svdbench.py`` (:data:`harness.remote_code.TEMPLATE`, format 2 on): the remote code with
  which ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`` loads the compressed
  model in plain transformers (without ``trust_remote_code`` transformers refuses the unknown
  ``model_type`` instead of building a dense model with random weights);
* ``svdbench.json`` (:data:`MANIFEST`): the format version, which module is replaced by which class
  at which rank, the tied aliases, the method's name and full config, the ratio, the record's run
  key, parameter counts, and the size and SHA-256 of every other file.

:func:`load_compressed` rebuilds the model from the directory alone: it checks every file against
the manifest (a truncated or edited file is refused with an :class:`ExportError` naming it), builds
the skeleton from the config with its parameters on the meta device (no dense weights are ever
allocated), swaps in the recorded modules at the recorded shapes, and adopts the stored tensors.
The loaded model computes bit-identical logits to the in-memory compressed one (same modules, same
tensors).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from harness.files import follow_umask
from harness.remote_code import RemoteCodeError, base_config, remote_config, write_remote_code
from methods.module_types import MODULE_TYPES

log = logging.getLogger(__name__)

FORMAT = "svdbench-lowrank"
# 2: config.json is the remote-code config and modeling_svdbench.py is carried (docs/export.md).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # this svdbench loads exports of these versions
MANIFEST = "svdbench.json"
DEFAULT_SHARD_BYTES = 4 << 30  # shards at 4 GiB, as the hub does for large checkpoints
AUTO_CLASSES = ("AutoModelForCausalLM", "AutoModel")


class ExportError(ValueError):
    """An export directory that cannot be written or loaded (missing, truncated, edited, unknown format)."""


# -- module specs ---------------------------------------------------------------------------------

def module_specs(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The replacement modules of ``model``: ``{dotted name: spec}`` in model order.

    A spec is ``{"class": export name, **module.export_spec()}`` (``in_features``, ``out_features``,
    ``rank``, ``bias`` and what else the type needs, e.g. a column-preserving layer's ``n_columns``):
    everything :func:`build_module` needs. Every type registered in
    :data:`methods.module_types.MODULE_TYPES` is found; a registered module inside another (the
    low-rank part of a column-preserving layer) is part of the outer one's spec, not an entry of its own.
    A shared tensor (one basis under every member of its group) is stored once by the writer
    (:func:`unique_tensors`), so the specs need not name groups.
    """
    return {name: MODULE_TYPES.spec(mod) for name, mod in MODULE_TYPES.replacements(model).items()}


def build_module(spec: Mapping[str, Any], device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> nn.Module:
    """An uninitialised replacement module of the shape ``spec`` describes (see :func:`module_specs`).

    Raises:
        ExportError: for a class no registered module type exports, or a malformed spec.
    """
    cls = spec.get("class")
    if cls not in MODULE_TYPES.names():
        raise ExportError(f"unknown module class {cls!r} (this svdbench knows {', '.join(MODULE_TYPES.names())})")
    try:
        return MODULE_TYPES.build(spec, device, dtype)
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"malformed module spec {dict(spec)}: {exc}") from exc


# -- writing ----------------------------------------------------------------------------------------

def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """SHA-256 of the manifest's canonical JSON without its ``digest`` field (what ``digest`` holds)."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def unique_tensors(named: Iterable[tuple[str, Tensor]]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Named tensors with every tensor kept once, on the CPU: ``(tensors, aliases)``.

    Tied tensors (e.g. ``lm_head.weight`` and the input embedding, or one shared basis under every
    member of its group) are the same tensor under several names; safetensors refuses shared
    storage, and storing each would multiply their bytes. ``aliases`` maps each dropped name to the
    kept one, so a loader can tie them again.
    """
    tensors: dict[str, Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, int, tuple[int, ...], tuple[int, ...], torch.dtype], str] = {}
    for name, t in named:
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() > 0 and ident in seen:
            aliases[name] = seen[ident]
            continue
        seen[ident] = name
        t = t.to("cpu")
        if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()  # a view into a larger storage: safetensors refuses shared memory
        tensors[name] = t
    return tensors, aliases


def unique_state(model: nn.Module) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The model's state dict with every tensor stored once (:func:`unique_tensors`)."""
    return unique_tensors(model.state_dict(keep_vars=False).items())


def _shards(tensors: Mapping[str, Tensor], max_bytes: int) -> list[dict[str, Tensor]]:
    """Split ``tensors`` greedily, in order, into groups of at most ``max_bytes`` (one oversize tensor alone)."""
    groups: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if groups[-1] and size + nbytes > max_bytes:
            groups.append({})
            size = 0
        groups[-1][name] = t
        size += nbytes
    return groups


def export_model(
    model: nn.Module,
    tokenizer: Any,
    out: Path | str,
    *,
    method: Mapping[str, Any],
    ratio: float | None = None,
    run_key: str | None = None,
    base_model: Mapping[str, Any] | None = None,
    compression: Mapping[str, Any] | None = None,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> Path:
    """Write the (compressed, in-memory) ``model`` and its tokenizer as an export directory.

    The directory is assembled under a temporary name beside ``out`` and renamed into place, so
    ``out`` is either absent or complete.

    Args:
        model: The compressed model (linears replaced by modules of registered types,
            :mod:`methods.module_types`); any device and dtype.
        tokenizer: Its tokenizer (``save_pretrained``).
        out: Target directory; must not exist or be empty.
        method: ``{"name": ..., "config": ...}`` as in the record.
        ratio: Requested ratio.
        run_key: The run key of the record this model belongs to.
        base_model: The record's ``model`` block (id, revision, content hash).
        compression: Achieved ratios, parameter counts and per-layer ranks
            (:func:`compression_summary`).
        max_shard_bytes: Largest weight file.

    Returns:
        ``out``.

    Raises:
        ExportError: when ``out`` exists and is not empty.
    """
    from safetensors.torch import save_file

    from harness.engine.models import is_encoder_config
    from harness.records import git_state, svdbench_version

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"export directory {out} exists and is not empty; remove it or choose another")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        tensors, aliases = unique_state(model)
        groups = _shards(tensors, max_shard_bytes)
        names = (["model.safetensors"] if len(groups) == 1
                 else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
        for fname, group in zip(names, groups, strict=True):
            # One metadata entry only: safetensors writes a map's entries in hash order, and the
            # bytes (hence the checksums) of an export of the same model must not change.
            save_file(group, str(tmp / fname), metadata={"format": "pt"})
        auto_class = AUTO_CLASSES[1] if is_encoder_config(model.config) else AUTO_CLASSES[0]
        specs = module_specs(model)
        try:
            write_remote_code(tmp, remote_config(model.config, type(model), auto_class, specs, aliases, FORMAT_VERSION))
        except RemoteCodeError as exc:
            raise ExportError(str(exc)) from exc
        # safetensors creates its files 0600 and mkdtemp its folder 0700; a shared export follows the umask
        follow_umask(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        elements: dict[str, int] = {}
        for t in tensors.values():
            key = str(t.dtype).removeprefix("torch.")
            elements[key] = elements.get(key, 0) + t.numel()
        manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "svdbench_version": svdbench_version(),
            "git_sha": git_state()["git_sha"],
            "torch": torch.__version__,
            "auto_class": auto_class,
            "architecture": type(model).__name__,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "base_model": dict(base_model or {}),
            "method": dict(method),
            "ratio": ratio,
            "run_key": run_key,
            "compression": dict(compression or {}),
            "modules": specs,
            "tied": aliases,
            "weights": names,
            "tensor_elements": elements,
            "tensor_bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "parameters": sum(p.numel() for p in model.parameters()),
            "files": {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                      for p in sorted(tmp.iterdir()) if p.is_file()},
        }
        manifest["digest"] = manifest_digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str), encoding="utf-8")
        if out.exists():
            out.rmdir()  # empty (checked above); os.replace cannot rename over a directory
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%d replaced modules, %.1f MB of tensors) to %s", manifest["method"].get("name"),
             len(manifest["modules"]), manifest["tensor_bytes"] / 1e6, out)
    return out


def compression_summary(result: Any) -> dict[str, Any]:
    """The export's ``compression`` block from a :class:`harness.engine.compress.CompressionResult`."""
    keep = ("name", "shape", "rank", "keep", "params")
    return {
        **result.counts(),
        "layers": [{k: layer.get(k) for k in keep} for layer in result.layers],
    }


# -- verifying and loading ----------------------------------------------------------------------

def read_manifest(path: Path | str) -> dict[str, Any]:
    """The manifest of the export at ``path``, checked for format, version and its own digest.

    Raises:
        ExportError: when it is missing, not JSON (e.g. truncated), of another format or version,
            or edited after export.
    """
    file = Path(path) / MANIFEST
    if not file.is_file():
        raise ExportError(f"{path} is not an svdbench export: {MANIFEST} is missing")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{file} is not valid JSON (truncated or edited?): {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{file} is not an {FORMAT} manifest")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        newer = isinstance(version, int) and version > FORMAT_VERSION
        raise ExportError(f"{file} has format version {version!r}; this svdbench reads versions "
                          f"{', '.join(map(str, READABLE_VERSIONS))}" + ("; upgrade svdbench to load it" if newer else ""))
    if manifest.get("digest") != manifest_digest(manifest):
        raise ExportError(f"{file} was changed after export (its digest does not match its content)")
    return manifest


def verify_export(path: Path | str, checksums: bool = True) -> dict[str, Any]:
    """Check every file the manifest lists: present, of the recorded size and (``checksums``) SHA-256.

    Returns:
        The manifest.

    Raises:
        ExportError: naming the first missing, truncated, grown or altered file.
    """
    root = Path(path)
    manifest = read_manifest(root)
    files = manifest.get("files") or {}
    for name in manifest.get("weights") or []:
        if name not in files:
            raise ExportError(f"{root}: weight file {name} has no checksum in {MANIFEST}")
    for name, meta in files.items():
        file = root / name
        if Path(name).name != name:
            raise ExportError(f"{root}: {MANIFEST} lists a file outside the export: {name!r}")
        if not file.is_file():
            raise ExportError(f"{root}: {name} is missing")
        size = file.stat().st_size
        if size != meta["bytes"]:
            what = "truncated" if size < meta["bytes"] else "longer than exported"
            raise ExportError(f"{root}: {name} is {what}: {size} bytes, the export wrote {meta['bytes']}")
        if checksums and sha256_file(file) != meta["sha256"]:
            raise ExportError(f"{root}: {name} does not match its SHA-256 in {MANIFEST} (corrupted or edited)")
    return manifest


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Create every new ``nn.Parameter`` on the meta device; buffers stay real.

    Buffers must stay real because models compute some in ``__init__`` and never store them
    (rotary ``inv_freq`` tables are non-persistent); parameters all come from the export.
    """
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _set_tensor(model: nn.Module, name: str, value: Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    if leaf in owner._parameters:
        owner._parameters[leaf] = value if isinstance(value, nn.Parameter) else nn.Parameter(value)
    else:
        owner._buffers[leaf] = value


def _get_tensor(model: nn.Module, name: str) -> Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


def load_compressed(
    path: Path | str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    checksums: bool = True,
) -> tuple[nn.Module, Any]:
    """Rebuild an exported compressed model from its directory alone.

    Args:
        path: The export directory.
        device: Where the model runs; stored tensors are read straight onto it.
        dtype: Cast floating tensors to this dtype after loading (None: as stored).
        checksums: Verify every file's SHA-256 (sizes are always checked).

    Returns:
        ``(model in eval mode, tokenizer)``; ``model.svdbench_export`` holds the manifest.

    Raises:
        ExportError: for a missing, truncated or edited file, an unknown format, or tensors that do
            not fit the recorded modules.
    """
    root = Path(path)
    return load_from_manifest(root, verify_export(root, checksums=checksums), device, dtype)


def load_from_manifest(
    root: Path,
    manifest: Mapping[str, Any],
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[nn.Module, Any]:
    """The model and tokenizer of the export at ``root`` as ``manifest`` describes them, without
    checking the files or the manifest's digest (:func:`load_compressed` does; ``svdbench validate``
    loads an edited manifest too, to name what else is wrong).

    Raises:
        ExportError: for tensors that do not fit the recorded modules, or an unreadable file.
    """
    import transformers
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from harness.engine.models import set_module

    auto = manifest.get("auto_class")
    if auto not in AUTO_CLASSES:
        raise ExportError(f"{root}: unknown auto_class {auto!r} in {MANIFEST}")
    try:
        config = base_config(root)  # format 2: config.json is the remote-code config around the base one
    except RemoteCodeError as exc:
        raise ExportError(f"{root}: {exc}") from exc
    kwargs = {"attn_implementation": manifest["attn_implementation"]} if manifest.get("attn_implementation") else {}
    with parameters_on_meta():
        model = getattr(transformers, auto).from_config(config, **kwargs)
    for name, spec in manifest["modules"].items():
        try:
            old = model.get_submodule(name)
        except AttributeError as exc:
            raise ExportError(f"{root}: the config's model has no module {name!r}") from exc
        new = build_module(spec, device="meta")
        if not isinstance(old, nn.Linear) or (old.in_features, old.out_features) != (new.in_features, new.out_features):
            raise ExportError(f"{root}: module {name} is {old!r} in the config's model, not a linear of "
                              f"{new.in_features} -> {new.out_features}")
        set_module(model, name, new)
    state: dict[str, Tensor] = {}
    for fname in manifest["weights"]:
        try:
            state.update(load_file(str(root / fname), device=str(torch.device(device))))
        except SafetensorError as exc:
            raise ExportError(f"{root}: cannot read {fname}: {exc}") from exc
    expected = set(model.state_dict().keys())
    tied = manifest.get("tied") or {}
    missing = sorted(expected - set(state) - set(tied))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise ExportError(f"{root}: tensors do not fit the recorded model: missing {missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise ExportError(f"{root}: tensors do not fit the recorded module shapes: {exc}") from exc
    for alias, source in tied.items():
        _set_tensor(model, alias, _get_tensor(model, source))
    left = [n for n, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False))
            if t.device.type == "meta"]
    if left:
        raise ExportError(f"{root}: no stored values for {left[:5]}")
    if dtype is not None:
        model.to(dtype=dtype)
    model.to(device)
    model.eval()
    model.svdbench_export = manifest
    # The base config, so that AutoTokenizer does not read config.json (whose remote code it would ask to run).
    tokenizer = AutoTokenizer.from_pretrained(root, config=config)
    return model, tokenizer


# -- engine glue: export a runner cell ----------------------------------------------------------

def export_is_complete(out: Path, run_key: str) -> bool:
    """Whether ``out`` already holds a complete export of the cell ``run_key`` (sizes checked, not hashes)."""
    if not (out / MANIFEST).is_file():
        return False
    try:
        return verify_export(out, checksums=False).get("run_key") == run_key
    except ExportError:
        return False
