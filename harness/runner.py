"""One run: a model x methods x ratios grid with one calibration and a list of evaluations.

Everything that can be checked without loading the model is checked first (ratios, method names,
data files, sequence lengths against the model config). Then the model is loaded once, the dense
model is evaluated once (its record is reused by later runs), the dense statistics are computed
once and shared by every method and ratio, and each (method, ratio) cell is compressed, evaluated,
recorded and undone. Finished cells (records with status ``ok``) are skipped, so a re-run resumes.
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness import data
from harness.cache import cache_path
from harness.engine.capture import Batch, capture_block_inputs
from harness.engine.compress import compress_model, restore
from harness.engine.offload import OFFLOAD_MODES, offloaded, placement, resident, streamed_logits
from harness.engine.statistics import CalibrationStatistics
from harness.engine.store import STORE_VERSION, StatsStore
from harness.evaluate import EvalSettings, compute_references, preflight, run_evaluations
from harness.models import (
    discover,
    fingerprint,
    is_encoder_config,
    load_model,
    max_positions,
    read_config,
    resolve_model_path,
)
from harness.perplexity import PROTOCOLS
from harness.probes import ProbeContext, build_probes
from harness.records import (
    SCHEMA_VERSION,
    peak_memory_bytes,
    provenance,
    read_record,
    run_key,
    svdbench_version,
    write_json_atomic,
)
from methods import Method, parse_method
from methods._linalg import SVD_DRIVERS, default_svd_driver, set_svd_driver

log = logging.getLogger(__name__)


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
    if cfg.eval_offload not in OFFLOAD_MODES:
        raise ValueError(f"--eval-offload must be one of {', '.join(OFFLOAD_MODES)}, got {cfg.eval_offload!r}")
    model_config = read_config(cfg.model)
    encoder = is_encoder_config(model_config)
    preflight(list(cfg.evals), encoder=encoder)
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

    The one definition shared by :class:`Session` (which writes records) and :func:`planned_keys`
    (which finds them without loading weights), so the two can never disagree.

    Args:
        prep: The validated run.
        model_info: :func:`harness.models.fingerprint` of the model (id, revision, content hash).
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
                 # only when set, so the keys of every record without a stride stay what they were
                 **({"window_stride": cfg.eval_window_stride} if cfg.eval_window_stride else {})},
        **({"svd_driver": cfg.svd_driver} if cfg.svd_driver else {}),
        "svdbench": svdbench_version(),
    }


def draw_calibration(prep: Prepared, tokenizer: Any, encoder: bool) -> data.Calibration:
    """The run's calibration windows (needs only the tokenizer, not the weights)."""
    cfg = prep.config
    sampler = data.sample_paragraph_calibration if encoder else data.sample_calibration
    return sampler(tokenizer, cfg.calib, cfg.calib_samples, prep.calib_seqlen, cfg.seed)


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


class Session:
    """A loaded model with its calibration statistics; runs cells against it."""

    def __init__(self, prep: Prepared) -> None:
        cfg = prep.config
        self.prep, self.cfg = prep, cfg
        t0 = time.perf_counter()
        self.model, self.tokenizer = load_model(cfg.model, prep.dtype)
        self.load_s = time.perf_counter() - t0
        self.layout = discover(self.model)
        set_svd_driver(cfg.svd_driver)
        self.encoder = is_encoder_config(self.model.config)
        self.model_info = {**fingerprint(cfg.model), "family": getattr(self.model.config, "model_type", None), "n_blocks": self.layout.n_blocks}
        self.settings = EvalSettings(
            prep.eval_seqlen, cfg.eval_batch_size, cfg.eval_max_windows, cfg.limit, cfg.tasks, cfg.seed, prep.device,
            window_stride=cfg.eval_window_stride,
        )
        self.results = Path(cfg.results)
        self.calibration: data.Calibration | None = None
        self._statistics: CalibrationStatistics | None = None
        self._scratch: tempfile.TemporaryDirectory | None = None
        self.placement = "resident"

    # -- shared pieces -------------------------------------------------------------------------
    def _batches(self) -> list[Batch]:
        assert self.calibration is not None
        cal = self.calibration
        return capture_block_inputs(self.model, self.layout, cal.input_ids, self.prep.device, attention_mask=cal.attention_mask)

    def statistics(self) -> CalibrationStatistics:
        """The calibration statistics of this session (calibration drawn once; store opened, nothing computed)."""
        if self._statistics is None:
            torch.manual_seed(self.cfg.seed)
            self.calibration = draw_calibration(self.prep, self.tokenizer, self.encoder)
            root = self.stats_store_path()
            if root is None:  # no stable identity of the weights: a store for this process only
                self._scratch = tempfile.TemporaryDirectory(prefix="svdbench-stats-")
                root = Path(self._scratch.name)
            identity = {"model": self.model_info.get("content_hash") or self.model_info.get("revision"),
                        "dtype": self.prep.dtype, "tokens": self.calibration.token_hash}
            self._statistics = CalibrationStatistics(self.model, self.layout, self._batches, self.prep.device,
                                                     StatsStore(root, self.layout.n_blocks), identity,
                                                     (self.calibration.input_ids, self.calibration.attention_mask))
        return self._statistics

    def stats_store_path(self) -> Path | None:
        """Statistics are stored per (model weights, dtype, calibration tokens); None without a content hash."""
        if self.model_info.get("content_hash") is None and self.model_info.get("revision") is None or self.calibration is None:
            return None
        key = run_key({"model": self.model_info.get("content_hash") or self.model_info.get("revision"),
                       "dtype": self.prep.dtype, "tokens": self.calibration.token_hash, "version": STORE_VERSION})
        return cache_path("stats", key)

    def probes(self, method: Method) -> dict[str, Any]:
        """The engine measurements ``method``'s allocator declared (building runs nothing)."""
        if not method.probes:
            return {}
        source = self.statistics()
        assert self.calibration is not None
        dense = method.statistics()
        ctx = ProbeContext(self.model, self.layout, self.calibration.input_ids, self.calibration.attention_mask,
                           self.prep.device, self.model_info, lambda i: source.load(i, dense)[0])
        return build_probes(method.probes, ctx)

    def calibration_tokens(self) -> int:
        assert self.calibration is not None
        cal = self.calibration
        return int(cal.attention_mask.sum()) if cal.attention_mask is not None else cal.input_ids.numel()

    def _evaluate(self) -> tuple[dict[str, Any], float]:
        """Run the evaluations with the model resident on the device, or streamed when it does not fit
        (:mod:`harness.engine.offload`); the placement is recorded by the caller."""
        t0 = time.perf_counter()
        names = list(self.cfg.evals)
        device = self.prep.device
        self.placement = placement(self.model, device, self.cfg.eval_offload)
        if self.placement == "resident":
            with resident(self.model, device):
                metrics = run_evaluations(names, self.model, self.tokenizer, self.settings)
            return metrics, time.perf_counter() - t0
        streamable = [n for n in names if n in PROTOCOLS]
        self.settings.forward = streamed_logits(self.model, self.layout, device)
        try:
            metrics = run_evaluations(streamable, self.model, self.tokenizer, self.settings)
        finally:
            self.settings.forward = None
        others = [n for n in names if n not in PROTOCOLS]
        if others:
            with offloaded(self.model, device):
                metrics.update(run_evaluations(others, self.model, self.tokenizer, self.settings))
        return {n: metrics[n] for n in names}, time.perf_counter() - t0

    def _key_fields(self, method: dict[str, Any], ratio: float, calib: dict | None) -> dict[str, Any]:
        return key_fields(self.prep, self.model_info, method, ratio, calib)

    def _base_record(self, key: str) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "run_key": key,
            "status": "ok",
            "error": None,
            "model": self.model_info,
            "limit": self.cfg.limit,
            "provenance": provenance(self.prep.device, self.prep.dtype, self.cfg.seed),
        }

    # -- cells ---------------------------------------------------------------------------------
    def references(self) -> None:
        """Dense references (e.g. embeddings) that compressed cells are compared against."""
        fits = placement(self.model, self.prep.device, self.cfg.eval_offload) == "resident"
        with (resident if fits else offloaded)(self.model, self.prep.device):
            compute_references(list(self.cfg.evals), self.model, self.tokenizer, self.settings)

    def run_dense(self) -> Path:
        """Evaluate the dense model once per (model, protocols); reuse an existing record."""
        self.references()
        key = run_key(self._key_fields({"name": "dense"}, 0.0, None))
        path = self.results / f"{key}.json"
        if (rec := read_record(path)) and rec.get("status") == "ok":
            log.info("dense record exists: %s", path)
            return path
        metrics, eval_s = self._evaluate()
        n = sum(m.params for m in self.layout.modules)
        total = sum(p.numel() for p in self.model.parameters())
        record = {
            **self._base_record(key),
            "method": {"name": "dense", "config": {}},
            "ratio": 0.0, "achieved_ratio": 0.0, "achieved_ratio_model": 0.0,
            "params_dense": n, "params_compressed": n, "params_model_dense": total, "params_model_compressed": total,
            "calibration": None, "metrics": metrics, "evaluation": {"placement": self.placement},
            "timings_s": {"load": self.load_s, "statistics": 0.0, "compress": 0.0, "eval": eval_s},
            "peak_memory_bytes": peak_memory_bytes(self.prep.device)["bytes"], "numerics": {}, "layers": [],
        }
        write_json_atomic(path, record)
        return path

    def run_cell(self, method: Method, ratio: float) -> Path:
        """Compress with ``method`` at ``ratio``, evaluate, write the record, restore the model."""
        source = self.statistics()
        assert self.calibration is not None
        calib = self.calibration.record()
        key = run_key(self._key_fields({"name": method.name, "config": method.config()}, ratio, calib))
        path = self.results / f"{key}.json"
        if (rec := read_record(path)) and rec.get("status") == "ok":
            log.info("cell done already: %s @ %.2f -> %s", method.name, ratio, path)
            if self.cfg.export:
                from harness.export import compress_and_export

                compress_and_export(self, method, ratio)  # no-op when the cell's export exists
            return path
        base = {
            **self._base_record(key),
            "method": {"name": method.name, "config": method.config()},
            "ratio": ratio,
            "calibration": calib,
        }
        if self.prep.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.prep.device)
        stats_before = source.seconds
        t0 = time.perf_counter()
        probes: dict[str, Any] = {}
        try:
            probes = self.probes(method)
            result = compress_model(self.model, self.layout, method, ratio, source, probes=probes)
        except Exception:
            write_json_atomic(path, {**base, "status": "failed", "error": traceback.format_exc()})
            raise
        compress_s = time.perf_counter() - t0
        try:
            metrics, eval_s = self._evaluate()
            if self.cfg.export:
                from harness.export import export_cell

                export_cell(self, method, ratio, key, result)
        except Exception:
            write_json_atomic(path, {**base, "status": "failed", "error": traceback.format_exc()})
            raise
        finally:
            restore(self.model, result)
        record = {
            **base,
            **result.counts(),
            "metrics": metrics,
            "evaluation": {"placement": self.placement},
            # statistics: dense statistics passes run for this cell (0 when read from the store);
            # allocation includes the probes; compress is the whole compression wall time.
            "timings_s": {"load": self.load_s, "statistics": source.seconds - stats_before, **result.timings_s,
                          "compress": compress_s, "eval": eval_s},
            "statistics_cached": not (source.seconds - stats_before),
            "statistics": {**result.statistics, "svd_driver": default_svd_driver(self.prep.device)},
            # Engine probes this cell's allocator ran (forwards, seconds, measure, cache hit); their
            # time is part of timings_s.allocation.
            "probes": {name: dict(p.last_cost) for name, p in probes.items() if getattr(p, "last_cost", None)},
            "peak_memory_bytes": peak_memory_bytes(self.prep.device)["bytes"],
            "numerics": {**result.numerics, "calibration_tokens_per_layer": self.calibration_tokens()},
            "layers": result.layers,
        }
        write_json_atomic(path, record)
        return path


def run(cfg: RunConfig) -> list[Path]:
    """Run the grid of ``cfg``: dense first, then every (method, ratio). Returns record paths.

    A failing cell is recorded (status ``failed`` with its traceback) and the others still run;
    the first failure is raised at the end.
    """
    prep = prepare(cfg)
    torch.manual_seed(cfg.seed)
    session = Session(prep)
    paths = [session.run_dense()]
    failures: list[BaseException] = []
    for method in prep.methods:
        for ratio in cfg.ratios:
            try:
                paths.append(session.run_cell(method, ratio))
            except Exception as exc:  # recorded in the cell's JSON; keep going
                log.error("cell %s @ %s failed: %s", method.name, ratio, exc)
                failures.append(exc)
    if failures:
        raise RuntimeError(f"{len(failures)} cell(s) failed; see their records in {cfg.results}") from failures[0]
    return paths


