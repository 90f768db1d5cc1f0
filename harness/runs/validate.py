"""``svdbench validate DIR``: check an export directory before trusting, sharing or evaluating it.

Checks, in order (each names what it found wrong; later checks run where earlier ones allow):

* ``manifest``: ``svdbench.json`` parses, is of this format and a readable version, and its digest
  matches its content;
* ``files``: every listed file is present with its size and SHA-256, and nothing unlisted is there;
* ``config`` (format 2): ``config.json``'s ``svdbench`` block records the same modules and tied names;
* ``modules``: every replaced module's stored tensors (read from the safetensors headers, no
  weights loaded) have the shapes its class and rank in the manifest imply, and each rank is the
  one of ``compression.layers``;
* ``load``: svdbench's loader builds the model;
* ``counts``: its parameter count, and the stored bytes, give the recorded parameter counts and
  achieved ratios (within ``tolerance``);
* ``logits``: finite logits on a fixed prompt;
* ``remote-code`` (optional): ``transformers`` with ``trust_remote_code=True`` gives the same logits;
* ``ppl`` (optional): a short perplexity, compared with the cell's record when one is found.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness.export import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    READABLE_VERSIONS,
    ExportError,
    build_module,
    load_from_manifest,
    manifest_digest,
    sha256_file,
)
from harness.remote_code import RemoteCodeError, read_block

__all__ = ["Finding", "Validation", "validate_export"]

PROMPT = ("The quick brown fox jumps over the lazy dog. Compressed language models should still "
          "assign finite scores to every token of an ordinary English sentence.")
DEFAULT_TOLERANCE = 1e-3  # absolute, on achieved ratios
DEFAULT_PPL_RTOL = 1e-3  # relative, on a perplexity recomputed under the record's protocol
_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Finding:
    """One check's outcome: ``ok`` and what it found."""

    check: str
    ok: bool
    message: str


@dataclass
class Validation:
    """Every finding of :func:`validate_export` on one directory."""

    path: Path
    findings: list[Finding] = field(default_factory=list)
    manifest: dict[str, Any] | None = None

    def add(self, check: str, ok: bool, message: str) -> bool:
        self.findings.append(Finding(check, ok, message))
        return ok

    @property
    def ok(self) -> bool:
        return all(f.ok for f in self.findings)

    def problems(self) -> list[Finding]:
        return [f for f in self.findings if not f.ok]

    def render(self) -> str:
        """A short summary line, then one line per finding (``ok`` or ``FAIL``)."""
        m = self.manifest or {}
        comp = m.get("compression") or {}
        achieved = comp.get("achieved_ratio")
        achieved = f"{achieved:.4f}" if isinstance(achieved, int | float) else "not recorded"
        what = (f"{(m.get('method') or {}).get('name', '?')} at ratio {m.get('ratio')} (achieved {achieved}), "
                f"format {m.get('format_version')}") if m else "no manifest"
        head = (f"{self.path}: OK, {what}" if self.ok
                else f"{self.path}: {len(self.problems())} problem(s), {what}")
        return "\n".join([head, *(f"  {'ok  ' if f.ok else 'FAIL'} {f.check}: {f.message}" for f in self.findings)])


# -- manifest, files, config ---------------------------------------------------------------------

def _check_manifest(root: Path, v: Validation) -> dict[str, Any] | None:
    file = root / MANIFEST
    if not file.is_file():
        v.add("manifest", False, f"{MANIFEST} is missing: not an svdbench export")
        return None
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        v.add("manifest", False, f"{MANIFEST} is not valid JSON (truncated or edited?): {exc}")
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        v.add("manifest", False, f"{MANIFEST} is not an {FORMAT} manifest")
        return None
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        v.add("manifest", False, f"format version {version!r}; this svdbench reads versions "
                                 f"{', '.join(map(str, READABLE_VERSIONS))} (newest {FORMAT_VERSION})")
        return None
    v.manifest = manifest
    if manifest.get("digest") != manifest_digest(manifest):
        v.add("manifest", False, f"{MANIFEST} was changed after export (its digest does not match its content)")
    else:
        v.add("manifest", True, f"format {FORMAT} version {version}, digest matches")
    return manifest


def _check_files(root: Path, manifest: Mapping[str, Any], v: Validation) -> bool:
    files = manifest.get("files") or {}
    problems = [f"weight file {n} has no checksum in {MANIFEST}" for n in manifest.get("weights") or [] if n not in files]
    for name, meta in files.items():
        file = root / name
        if Path(name).name != name:
            problems.append(f"{MANIFEST} lists a file outside the export: {name!r}")
        elif not file.is_file():
            problems.append(f"{name} is missing")
        elif (size := file.stat().st_size) != meta.get("bytes"):
            what = "truncated" if size < meta.get("bytes", 0) else "longer than exported"
            problems.append(f"{name} is {what}: {size} bytes, the export wrote {meta.get('bytes')}")
        elif sha256_file(file) != meta.get("sha256"):
            problems.append(f"{name} does not match its SHA-256 in {MANIFEST} (corrupted or edited)")
    extra = sorted(p.name for p in root.iterdir() if p.is_file() and p.name != MANIFEST and p.name not in files)
    problems += [f"{name} is not listed in {MANIFEST} (added after export?)" for name in extra]
    for problem in problems:
        v.add("files", False, problem)
    if not problems:
        v.add("files", True, f"{len(files)} files present with their recorded sizes and SHA-256")
    return not problems


def _check_config(root: Path, manifest: Mapping[str, Any], v: Validation) -> None:
    if manifest.get("format_version", 1) < 2:
        v.add("config", True, "format 1: config.json is the base model's own (no remote code)")
        return
    try:
        block = read_block(json.loads((root / "config.json").read_text(encoding="utf-8")))
    except (OSError, ValueError, RemoteCodeError) as exc:
        v.add("config", False, f"config.json cannot be read as a remote-code config: {exc}")
        return
    if block is None:
        v.add("config", False, "config.json has no 'svdbench' block: transformers would build the dense model "
                               "with random factors")
        return
    problems = []
    if block.get("modules") != manifest.get("modules"):
        differ = sorted(n for n in {*block.get("modules", {}), *manifest.get("modules", {})}
                        if (block.get("modules") or {}).get(n) != (manifest.get("modules") or {}).get(n))
        problems.append(f"config.json and {MANIFEST} record different modules: {differ[:3]}")
    if block.get("tied") != manifest.get("tied"):
        problems.append(f"config.json and {MANIFEST} record different tied names")
    if block.get("base_architecture") != manifest.get("architecture"):
        problems.append(f"config.json builds {block.get('base_architecture')}, {MANIFEST} records "
                        f"{manifest.get('architecture')}")
    for problem in problems:
        v.add("config", False, problem)
    if not problems:
        v.add("config", True, f"remote-code config builds {block.get('base_architecture')} with the recorded modules")


# -- tensors: shapes and counts from the safetensors headers -------------------------------------

def read_safetensors_header(file: Path) -> dict[str, dict[str, Any]]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` from a safetensors file's JSON header.

    Raises:
        ExportError: when the file is too short for its header or the header is not valid JSON.
    """
    with file.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ExportError(f"{file.name} is shorter than a safetensors header")
        (length,) = struct.unpack("<Q", raw)
        text = fh.read(length)
    if len(text) < length:
        raise ExportError(f"{file.name} ends inside its safetensors header")
    try:
        header = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{file.name}: unreadable safetensors header ({exc})") from exc
    header.pop("__metadata__", None)
    return {**header, "__header_bytes__": 8 + length}


def _stored_tensors(root: Path, manifest: Mapping[str, Any], v: Validation) -> dict[str, dict[str, Any]] | None:
    tensors: dict[str, dict[str, Any]] = {}
    for name in manifest.get("weights") or []:
        file = root / name
        try:
            header = read_safetensors_header(file)
        except (OSError, ExportError) as exc:
            v.add("modules", False, f"cannot read the tensors of {name}: {exc}")
            return None
        header_bytes = header.pop("__header_bytes__")
        data = max((int(t["data_offsets"][1]) for t in header.values()), default=0)
        if file.stat().st_size != header_bytes + data:
            v.add("modules", False, f"{name}: its header describes {data} bytes of tensors, the file holds "
                                    f"{file.stat().st_size - header_bytes}")
        tensors.update({k: {**t, "file": name} for k, t in header.items()})
    return tensors


def _expected_shapes(name: str, spec: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The tensors a replaced module stores, with the shapes its spec implies: the state of its module
    type built at that shape on the meta device (nothing allocated), so every registered type is checked.

    Raises:
        ExportError: for an unknown class or a malformed spec.
    """
    module = build_module(spec, device="meta")
    return {f"{name}.{key}": tuple(t.shape) for key, t in module.state_dict().items()}


def _check_modules(manifest: Mapping[str, Any], tensors: Mapping[str, Mapping[str, Any]], v: Validation) -> None:
    tied = manifest.get("tied") or {}
    layer_ranks = {layer.get("name"): layer.get("rank") for layer in (manifest.get("compression") or {}).get("layers", [])}
    problems: list[str] = []
    modules = manifest.get("modules") or {}
    for name, spec in modules.items():
        label = f"{name} ({spec.get('class')} of rank {spec.get('rank')} in {MANIFEST})"
        try:
            expected = _expected_shapes(name, spec)
        except (ExportError, KeyError, TypeError, ValueError) as exc:
            problems.append(f"{label}: malformed module spec ({exc})")
            continue
        for key, shape in expected.items():
            stored = tensors.get(tied.get(key, key))
            if stored is None:
                problems.append(f"{label}: no stored tensor {key}")
            elif tuple(stored["shape"]) != shape:
                problems.append(f"{label}: {key} is stored with shape {tuple(stored['shape'])} in {stored['file']}, "
                                f"its rank implies {shape}")
        if name in layer_ranks and layer_ranks[name] != spec.get("rank"):
            problems.append(f"{label}: compression.layers records rank {layer_ranks[name]}")
    for problem in problems:
        v.add("modules", False, problem)
    if not problems:
        classes = sorted({str(s.get("class")) for s in modules.values()})
        v.add("modules", True, f"{len(modules)} replaced modules ({', '.join(classes)}) store tensors of their "
                               "recorded ranks")


def _check_counts(manifest: Mapping[str, Any], model: torch.nn.Module, tensors: Mapping[str, Mapping[str, Any]],
                  tolerance: float, v: Validation) -> None:
    params = sum(p.numel() for p in model.parameters())
    stored_bytes = sum(math.prod(t["shape"]) * _DTYPE_BYTES.get(t["dtype"], 0) for t in tensors.values())
    floats = [t for t in tensors.values() if t["dtype"].startswith(("F", "BF"))]
    float_bytes = sum(math.prod(t["shape"]) * _DTYPE_BYTES.get(t["dtype"], 0) for t in floats)
    float_dtypes = {t["dtype"] for t in floats}
    problems = []
    if manifest.get("parameters") != params:
        problems.append(f"{MANIFEST} records {manifest.get('parameters')} parameters, the model has {params}")
    if manifest.get("tensor_bytes") != stored_bytes:
        problems.append(f"{MANIFEST} records {manifest.get('tensor_bytes')} tensor bytes, the files store {stored_bytes}")
    comp = manifest.get("compression") or {}
    dense, targets = comp.get("params_model_dense"), comp.get("params_dense")
    if not (isinstance(dense, int) and isinstance(targets, int) and dense > 0 and targets > 0):
        for p in problems:
            v.add("counts", False, p)
        if not problems:
            v.add("counts", True, f"{params} parameters, {stored_bytes} tensor bytes; no recorded ratio to compare")
        return
    # Everything outside the target linears (embeddings, norms, biases) is stored unchanged.
    compressed_targets = params - (dense - targets)
    actual = {"achieved_ratio": 1.0 - compressed_targets / targets, "achieved_ratio_model": 1.0 - params / dense}
    for key, value in actual.items():
        recorded = comp.get(key)
        if not isinstance(recorded, int | float) or abs(recorded - value) > tolerance:
            problems.append(f"{key} {recorded} in {MANIFEST} disagrees with the stored model: {value:.6f} "
                            f"(tolerance {tolerance:g})")
    if len(float_dtypes) == 1:
        # The bytes a dense model of this dtype would store, against the floating bytes stored here.
        by_bytes = 1.0 - float_bytes / (dense * _DTYPE_BYTES[float_dtypes.pop()])
        recorded = comp.get("achieved_ratio_model")
        if isinstance(recorded, int | float) and abs(recorded - by_bytes) > tolerance:
            problems.append(f"the stored bytes give a model ratio of {by_bytes:.6f}, {MANIFEST} records "
                            f"achieved_ratio_model {recorded} (tolerance {tolerance:g})")
    for key, value in (("params_model_compressed", params), ("params_compressed", compressed_targets)):
        if comp.get(key) != value:
            problems.append(f"{key} {comp.get(key)} in {MANIFEST}, the stored model has {value}")
    for p in problems:
        v.add("counts", False, p)
    if not problems:
        v.add("counts", True, f"{params} parameters and {stored_bytes} tensor bytes give achieved ratio "
                              f"{actual['achieved_ratio']:.4f} (model {actual['achieved_ratio_model']:.4f}), "
                              f"as recorded (tolerance {tolerance:g})")


# -- running the model ---------------------------------------------------------------------------

def _prompt_ids(tokenizer: Any, model: torch.nn.Module) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return ids[:, :limit] if isinstance(limit, int) and limit > 0 else ids


@torch.no_grad()
def _check_logits(model: torch.nn.Module, tokenizer: Any, device: torch.device, v: Validation) -> torch.Tensor | None:
    ids = _prompt_ids(tokenizer, model).to(device)
    out = model(input_ids=ids)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out.last_hidden_state  # an encoder export: its hidden states
    bad = int((~torch.isfinite(logits)).sum())
    if bad:
        v.add("logits", False, f"{bad} of {logits.numel()} outputs on the fixed prompt are not finite")
        return None
    v.add("logits", True, f"finite outputs on a fixed prompt of {ids.shape[1]} tokens "
                          f"(max |value| {logits.abs().max().item():.3g})")
    return logits.cpu()


@torch.no_grad()
def _check_remote_code(root: Path, manifest: Mapping[str, Any], tokenizer: Any, reference: torch.Tensor,
                       model: torch.nn.Module, device: torch.device, v: Validation) -> None:
    import transformers

    if manifest.get("format_version", 1) < 2:
        v.add("remote-code", True, "format 1 export: carries no remote code (skipped)")
        return
    auto = getattr(transformers, str(manifest.get("auto_class")))
    dtype = next(model.parameters()).dtype
    try:
        remote = auto.from_pretrained(root, trust_remote_code=True, dtype=dtype).to(device).eval()
    except Exception as exc:  # whatever transformers raises, the finding names it
        v.add("remote-code", False, f"transformers cannot load it with trust_remote_code=True: {exc}")
        return
    out = remote(input_ids=_prompt_ids(tokenizer, model).to(device))
    logits = getattr(out, "logits", None)
    logits = out.last_hidden_state if logits is None else logits
    if torch.equal(logits.cpu(), reference):
        v.add("remote-code", True, f"transformers' {type(remote).__name__} gives identical outputs")
    else:
        diff = (logits.cpu().float() - reference.float()).abs().max().item()
        v.add("remote-code", False, f"transformers' remote code gives different outputs (max diff {diff:.3g})")


_PROTOCOL = re.compile(r"^(?P<name>[\w-]+)@(?:[\w]+-)?(?P<seqlen>\d+)(?::every(?P<stride>\d+))?(?::first(?P<first>\d+))?$")


def _recorded(manifest: Mapping[str, Any], results: Path | None, name: str) -> dict[str, Any] | None:
    """The cell record's ``metrics[name]``, when the record is found under ``results``."""
    key = manifest.get("run_key")
    if results is None or not key or not (results / f"{key}.json").is_file():
        return None
    metric = (json.loads((results / f"{key}.json").read_text(encoding="utf-8")).get("metrics") or {}).get(name)
    return metric if isinstance(metric, dict) else None


def _check_ppl(model: torch.nn.Module, tokenizer: Any, manifest: Mapping[str, Any], source: str,
               seqlen: int | None, windows: int | None, results: Path | None, rtol: float, device: torch.device,
               v: Validation) -> None:
    from harness.evaluations.perplexity import PROTOCOLS, evaluate_protocol, perplexity

    recorded = None if source.startswith("file:") else _recorded(manifest, results, source)
    match = _PROTOCOL.match(str((recorded or {}).get("protocol", "")))
    if match and seqlen is None and windows is None:  # rerun the record's own protocol
        seqlen, windows = int(match["seqlen"]), int(match["first"]) if match["first"] else None
        stride = int(match["stride"]) if match["stride"] else None
    else:
        stride = None
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        seqlen = seqlen or min(256, limit)
        windows = windows if windows is not None else 4
    if source.startswith("file:"):
        text = Path(source[len("file:"):]).expanduser().read_text(encoding="utf-8")
        result = {"protocol": f"{source}@{seqlen}:first{windows}",
                  **perplexity(model, tokenizer(text, return_tensors="pt").input_ids[0], seqlen, device,
                               max_windows=windows)}
    elif source in PROTOCOLS:
        result = evaluate_protocol(source, model, tokenizer, seqlen, device, max_windows=windows, stride=stride)
    else:
        raise ValueError(f"--ppl takes {', '.join(PROTOCOLS)} or file:PATH, got {source!r}")
    ppl = result.get("ppl")
    if ppl is None or not math.isfinite(ppl):
        v.add("ppl", False, f"perplexity on {result['protocol']} is not finite ({result.get('nonfinite_windows')} "
                            "non-finite windows)")
        return
    if recorded is None or recorded.get("protocol") != result["protocol"]:
        why = ("no record to compare with" if recorded is None
               else f"the record's protocol is {recorded.get('protocol')}, not compared")
        v.add("ppl", True, f"perplexity {ppl:.4g} on {result['protocol']} ({why})")
        return
    want = recorded.get("ppl")
    if not isinstance(want, int | float) or abs(ppl - want) > rtol * abs(want):
        v.add("ppl", False, f"perplexity {ppl:.6g} on {result['protocol']}, the record says {want} "
                            f"(relative tolerance {rtol:g})")
    else:
        v.add("ppl", True, f"perplexity {ppl:.6g} on {result['protocol']} matches the record's {want:.6g}")


# -- the whole check ----------------------------------------------------------------------------------

def validate_export(
    path: Path | str,
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    remote_code: bool = False,
    ppl: str | None = None,
    ppl_seqlen: int | None = None,
    ppl_windows: int | None = None,
    results: Path | str | None = None,
    ppl_rtol: float = DEFAULT_PPL_RTOL,
    device: str = "cpu",
) -> Validation:
    """Check the export at ``path`` (module docstring); never raises for a bad export, only reports it.

    Args:
        path: The export directory.
        tolerance: Largest absolute difference between a recorded and a recomputed achieved ratio.
        remote_code: Also load it with transformers' ``trust_remote_code=True`` (runs the directory's
            ``modeling_svdbench.py``) and compare outputs.
        ppl: A short perplexity: ``wikitext2`` / ``ptb`` / ``c4`` (svdbench's protocols) or
            ``file:PATH`` (plain text).
        ppl_seqlen / ppl_windows: Window length and count (default: the record's protocol when
            ``results`` holds the cell's record, else 256 tokens (at most the model's limit) and 4 windows).
        results: A results directory; the record named by the manifest's run key gives the
            perplexity to compare with.
        ppl_rtol: Relative tolerance of that comparison.
        device: Where the model runs.

    Raises:
        ValueError: for bad arguments (not for a bad export), e.g. a missing directory.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root} is not a directory")
    if tolerance < 0 or ppl_rtol < 0:
        raise ValueError("tolerances must be non-negative")
    v = Validation(root)
    manifest = _check_manifest(root, v)
    if manifest is None:
        return v
    files_ok = _check_files(root, manifest, v)
    _check_config(root, manifest, v)
    tensors = _stored_tensors(root, manifest, v)
    if tensors is not None:
        _check_modules(manifest, tensors, v)
    if not files_ok or tensors is None:
        v.add("load", False, "not loaded: the files do not match the manifest")
        return v
    dev = torch.device(device)
    try:
        model, tokenizer = load_from_manifest(root, manifest, device=dev)  # the files were checked above
    except (ExportError, OSError, RuntimeError, ValueError) as exc:
        v.add("load", False, f"svdbench's loader refuses it: {exc}")
        return v
    v.add("load", True, f"{type(model).__name__} with {len(manifest.get('modules') or {})} replaced modules")
    _check_counts(manifest, model, tensors, tolerance, v)
    reference = _check_logits(model, tokenizer, dev, v)
    if remote_code and reference is not None:
        _check_remote_code(root, manifest, tokenizer, reference, model, dev, v)
    if ppl is not None:
        _check_ppl(model, tokenizer, manifest, ppl, ppl_seqlen, ppl_windows, None if results is None else Path(results),
                   ppl_rtol, dev, v)
    return v
