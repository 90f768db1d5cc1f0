"""A run's configuration, validated before any weights load, and the run keys of its cells.

:func:`prepare` checks everything that can be checked without loading the model (ratios, method
names, evaluation names and options, data files, sequence lengths against the model config);
:func:`key_fields` is the one definition of what determines a cell's result, shared by the engine
(which names records with it) and the sweep planner (which finds them without loading weights).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness import data
from harness.engine.models import (
    fingerprint,
    is_encoder_config,
    max_positions,
    read_config,
    resolve_model_path,
)
from harness.engine.offload import OFFLOAD_MODES
from harness.evaluations import preflight
from harness.records import run_key, svdbench_version
from methods import Method, parse_method
from methods._linalg import SVD_DRIVERS

__all__ = [
    "EvalOptions", "Prepared", "RunConfig", "compression_key_fields", "draw_calibration", "eval_options", "freeze_eval_options", "key_fields",
    "planned_keys", "prepare", "resolve_device", "resolve_dtype",
]

log = logging.getLogger(__name__)

#: Evaluation options in hashable form: ``((evaluation, ((option, value), ...)), ...)``, sorted.
EvalOptions = tuple[tuple[str, tuple[tuple[str, Any], ...]], ...]


def _frozen(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    return value


def freeze_eval_options(options: Mapping[str, Mapping[str, Any]] | None) -> EvalOptions:
    """``{"toy": {"scale": 2}}`` -> the hashable form a frozen :class:`RunConfig` holds."""
    return tuple(sorted((name, tuple(sorted((k, _frozen(v)) for k, v in opts.items())))
                        for name, opts in (options or {}).items() if opts))


def eval_options(frozen: EvalOptions) -> dict[str, dict[str, Any]]:
    """The hashable form back as ``{evaluation: {option: value}}``."""
    return {name: dict(opts) for name, opts in frozen}


@dataclass(frozen=True)
class RunConfig:
    """Everything a ``svdbench run`` needs (the CLI flags one to one)."""

    model: str
    methods: tuple[str, ...]
    ratios: tuple[float, ...]
    evals: tuple[str, ...] = ("wikitext2",)
    calib: str = "wikitext2"
    calib_samples: int = 256
    calib_seqlen: int | None = None  # default: min(2048, model max positions)
    eval_seqlen: int | None = None
    eval_batch_size: int = 8
    eval_max_windows: int | None = None
    limit: int | None = None
    tasks: tuple[str, ...] | None = None
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    results: str = "results"
    eval_offload: str = "auto"  # auto, never or always: evaluation streams blocks when the model does not fit
    eval_window_stride: int | None = None  # perplexity on every k-th window (a named subset protocol)
    svd_driver: str | None = None  # top-k routine of the factorizers (None: gram-eigh on CUDA, svd on the CPU)
    export: str | None = None  # directory: each compressed cell is also exported to <export>/<run key>
    eval_options: EvalOptions = ()  # options of registered evaluations (freeze_eval_options)
    # Folder of stored compressions (harness.runs.compressions): a cell compressed once is evaluated
    # from there by later runs; None: compress every cell that is run (no store).
    compressed_store: str | None = None
    compressed_store_max_gb: float | None = None  # bound of the store (least recently used evicted)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but CUDA is not available")
    if name not in {"cuda", "cpu"} and not name.startswith("cuda:"):
        raise ValueError(f"unknown device {name!r}; use auto, cuda or cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> str:
    if name == "auto":
        return "float16" if device.type == "cuda" else "float32"
    if name not in {"float16", "bfloat16", "float32"}:
        raise ValueError(f"unknown dtype {name!r}; use float16, bfloat16 or float32")
    return name


@dataclass(frozen=True)
class Prepared:
    """A validated run: resolved methods, device, dtype and sequence lengths."""

    config: RunConfig
    methods: tuple[Method, ...]
    device: torch.device
    dtype: str
    eval_seqlen: int
    calib_seqlen: int


def prepare(cfg: RunConfig) -> Prepared:
    """Validate a run without loading the model (clear errors before expensive work)."""
    for r in cfg.ratios:
        if not 0.0 < r < 1.0:
            raise ValueError(f"ratio must lie in (0, 1) (fraction of parameters removed), got {r}")
    if not cfg.methods:
        raise ValueError("no method given")
    methods = tuple(parse_method(m) for m in cfg.methods)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    for n, v in (("calib-samples", cfg.calib_samples), ("calib-seqlen", cfg.calib_seqlen), ("eval-batch-size", cfg.eval_batch_size),
                 ("eval-window-stride", cfg.eval_window_stride)):
        if v is not None and v < 1:
            raise ValueError(f"--{n} must be positive, got {v}")
    if cfg.svd_driver is not None and cfg.svd_driver not in SVD_DRIVERS:
        raise ValueError(f"--svd-driver must be one of {', '.join(SVD_DRIVERS)}, got {cfg.svd_driver!r}")
    if cfg.compressed_store_max_gb is not None and cfg.compressed_store_max_gb < 0:
        raise ValueError(f"--compressed-store-max-gb must be non-negative, got {cfg.compressed_store_max_gb}")
    if cfg.compressed_store_max_gb is not None and cfg.compressed_store is None:
        raise ValueError("--compressed-store-max-gb bounds a store: give --compressed-store DIR too")
    if cfg.compressed_store is not None:
        store = Path(cfg.compressed_store).expanduser()
        if store.exists() and not store.is_dir():
            raise ValueError(f"--compressed-store {store} exists and is not a folder")
    if cfg.eval_offload not in OFFLOAD_MODES:
        raise ValueError(f"--eval-offload must be one of {', '.join(OFFLOAD_MODES)}, got {cfg.eval_offload!r}")
    model_config = read_config(cfg.model)
    encoder = is_encoder_config(model_config)
    preflight(list(cfg.evals), encoder=encoder, options=eval_options(cfg.eval_options))
    for method in methods if encoder else ():
        if reasons := method.causal_lm_reasons():
            raise ValueError(f"method {method.name!r} cannot run on {cfg.model}, an encoder without a next-token "
                             f"loss: {'; '.join(reasons)}")
    data.check_calibration_source(cfg.calib)
    limit = max_positions(model_config)
    if cfg.eval_seqlen is not None and limit is not None and cfg.eval_seqlen > limit:
        raise ValueError(f"--eval-seqlen {cfg.eval_seqlen} exceeds the model's maximum of {limit} positions")
    if cfg.calib_seqlen is not None and limit is not None and cfg.calib_seqlen > limit:
        raise ValueError(f"--calib-seqlen {cfg.calib_seqlen} exceeds the model's maximum of {limit} positions")
    eval_seqlen = cfg.eval_seqlen or min(2048, limit or 2048)
    calib_seqlen = cfg.calib_seqlen or min(2048, limit or 2048)
    return Prepared(cfg, methods, device, dtype, eval_seqlen, calib_seqlen)


def key_fields(prep: Prepared, model_info: Mapping[str, Any], method: dict[str, Any], ratio: float,
               calib: dict[str, Any] | None) -> dict[str, Any]:
    """Everything that determines a cell's result; its hash is the run key (the record's file name).

    The one definition shared by :class:`harness.runs.session.Session` (which writes records) and
    :func:`planned_keys` (which finds them without loading weights), so the two can never disagree.
    Fields added after records were first written (window stride, SVD driver, evaluation options)
    enter only when set, so every older record keeps its key.

    Args:
        prep: The validated run.
        model_info: :func:`harness.engine.models.fingerprint` of the model (id, revision, content hash).
        method: ``{"name": ..., "config": ...}`` (``{"name": "dense"}`` for the dense record).
        ratio: Requested ratio (0.0 for dense).
        calib: :meth:`harness.data.Calibration.record` (None for dense).
    """
    cfg = prep.config
    return {
        "model": {k: model_info.get(k) for k in ("id", "revision", "content_hash")},
        "dtype": prep.dtype,
        "method": method,
        "ratio": ratio,
        "calibration": calib,
        "evals": sorted(cfg.evals),
        "eval": {"seqlen": prep.eval_seqlen, "max_windows": cfg.eval_max_windows, "limit": cfg.limit, "tasks": cfg.tasks,
                 **({"window_stride": cfg.eval_window_stride} if cfg.eval_window_stride else {}),
                 **({"options": eval_options(cfg.eval_options)} if cfg.eval_options else {})},
        **({"svd_driver": cfg.svd_driver} if cfg.svd_driver else {}),
        "svdbench": svdbench_version(),
    }


def compression_key_fields(prep: Prepared, model_info: Mapping[str, Any], method: dict[str, Any], ratio: float,
                           calib: dict[str, Any]) -> dict[str, Any]:
    """What determines a cell's compressed model, and nothing about how it is evaluated.

    Its hash names the cell's stored compression (:mod:`harness.runs.compressions`); every record
    that evaluates that compressed model, whatever its evaluations, carries it as
    ``compression.key``. The fields are :func:`key_fields` without the evaluation ones.
    """
    fields = key_fields(prep, model_info, method, ratio, calib)
    return {"kind": "compression", **{k: v for k, v in fields.items() if k not in ("evals", "eval")}}


# Calibration draws of this process, so that planning a sweep and running its cells draw each
# calibration once (a draw tokenizes the whole calibration text).
_DRAWS: dict[tuple[Any, ...], data.Calibration] = {}
_MAX_DRAWS = 8


def draw_calibration(prep: Prepared, tokenizer: Any, encoder: bool) -> data.Calibration:
    """The run's calibration windows (needs only the tokenizer, not the weights); drawn once per
    process for each (model, source, samples, length, seed)."""
    cfg = prep.config
    source = cfg.calib
    if source.startswith("file:"):  # a file edited in place is a new calibration
        stat = Path(source[len("file:"):]).expanduser().stat()
        source = f"{source}@{stat.st_mtime_ns}:{stat.st_size}"
    memo = (str(resolve_model_path(cfg.model)), source, cfg.calib_samples, prep.calib_seqlen, cfg.seed, encoder)
    if memo not in _DRAWS:
        sampler = data.sample_paragraph_calibration if encoder else data.sample_calibration
        if len(_DRAWS) >= _MAX_DRAWS:
            _DRAWS.pop(next(iter(_DRAWS)))
        _DRAWS[memo] = sampler(tokenizer, cfg.calib, cfg.calib_samples, prep.calib_seqlen, cfg.seed)
    return _DRAWS[memo]


def planned_keys(prep: Prepared) -> dict[tuple[str, float], str]:
    """Run keys of the dense record and of every (method, ratio) cell, without loading weights.

    The model is identified by hashing its files and the calibration by hashing its tokens, so
    this costs a tokenizer load and one tokenization of the calibration text.

    Returns:
        ``{("dense", 0.0): key, (method name, ratio): key, ...}``.
    """
    from transformers import AutoTokenizer

    cfg = prep.config
    model_info = fingerprint(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(cfg.model))
    calib = draw_calibration(prep, tokenizer, is_encoder_config(read_config(cfg.model))).record()
    keys = {("dense", 0.0): run_key(key_fields(prep, model_info, {"name": "dense"}, 0.0, None))}
    for method in prep.methods:
        for ratio in cfg.ratios:
            fields = key_fields(prep, model_info, {"name": method.name, "config": method.config()}, ratio, calib)
            keys[(method.name, ratio)] = run_key(fields)
    return keys
