"""A loaded model with its calibration statistics: compresses and evaluates one cell at a time.

A :class:`Session` loads the model once, draws the calibration once, opens the statistics store
(dense statistics are computed on first use and shared by every method and ratio), computes the
dense references of the evaluations, and for each cell compresses, evaluates and restores the
model. It writes nothing: :mod:`harness.runs.loop` turns what it measures into records.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from harness import data
from harness.cache import cache_path
from harness.engine.capture import Batch, capture_block_inputs
from harness.engine.compress import CompressionResult, compress_model, restore
from harness.engine.models import discover, fingerprint, is_encoder_config, load_model
from harness.engine.offload import offloaded, placement, resident, streamed_logits
from harness.engine.probes import ProbeContext, build_probes
from harness.engine.statistics import CalibrationStatistics
from harness.engine.store import STORE_VERSION, StatsStore
from harness.evaluations import (
    EVALUATIONS,
    EvalSettings,
    compute_references,
    resolve_options,
    run_evaluations,
)
from harness.files import quarantine
from harness.records import run_key
from harness.runs.compressions import CompressionStore, StoredCompressionError
from harness.runs.config import Prepared, compression_key_fields, draw_calibration, eval_options, key_fields
from harness.work_claims import wait_for
from methods import Method
from methods._linalg import set_svd_driver

__all__ = ["CompressedCell", "Evaluated", "Session"]


@dataclass
class Evaluated:
    """The evaluations' results and where the model ran (``resident`` or streamed/offloaded)."""

    metrics: dict[str, Any]
    seconds: float
    placement: str


@dataclass
class CompressedCell:
    """A compressed model (restore with :meth:`Session.restore`) and what its compression cost."""

    method: Method
    ratio: float
    result: CompressionResult
    seconds: float
    statistics_seconds: float  # dense statistics passes run for this cell (0 when read from the store)
    probes: dict[str, Any] = field(default_factory=dict)
    stored: dict[str, Any] | None = None  # the stored compression's manifest when installed from a store


class Session:
    """A loaded model with its calibration statistics; compresses and evaluates cells against it."""

    def __init__(self, prep: Prepared) -> None:
        cfg = prep.config
        self.prep, self.cfg = prep, cfg
        t0 = time.perf_counter()
        self.model, self.tokenizer = load_model(cfg.model, prep.dtype)
        self.load_s = time.perf_counter() - t0
        self.layout = discover(self.model)
        set_svd_driver(cfg.svd_driver)
        self.encoder = is_encoder_config(self.model.config)
        self.model_info = {**fingerprint(cfg.model), "family": getattr(self.model.config, "model_type", None),
                           "n_blocks": self.layout.n_blocks}
        self.settings = EvalSettings(
            prep.eval_seqlen, cfg.eval_batch_size, cfg.eval_max_windows, cfg.limit, cfg.tasks, cfg.seed, prep.device,
            window_stride=cfg.eval_window_stride, options=resolve_options(cfg.evals, eval_options(cfg.eval_options)),
        )
        self.results = Path(cfg.results)
        self.calibration: data.Calibration | None = None
        self._statistics: CalibrationStatistics | None = None
        self._scratch: tempfile.TemporaryDirectory | None = None
        self._references_done = False
        max_gb = cfg.compressed_store_max_gb
        self.store = (CompressionStore(cfg.compressed_store, None if max_gb is None else int(max_gb * 1e9))
                      if cfg.compressed_store else None)

    # -- keys ----------------------------------------------------------------------------------
    def dense_fields(self) -> dict[str, Any]:
        """The fields the dense record's run key hashes (:func:`key_fields`)."""
        return key_fields(self.prep, self.model_info, {"name": "dense"}, 0.0, None)

    def dense_key(self) -> str:
        return run_key(self.dense_fields())

    def cell_fields(self, method: Method, ratio: float) -> dict[str, Any]:
        """The fields the cell's run key hashes (:func:`key_fields`)."""
        self.statistics()  # draws the calibration
        assert self.calibration is not None
        block = {"name": method.name, "config": method.config()}
        return key_fields(self.prep, self.model_info, block, ratio, self.calibration.record())

    def cell_key(self, method: Method, ratio: float) -> str:
        return run_key(self.cell_fields(method, ratio))

    def compression_fields(self, method: Method, ratio: float) -> dict[str, Any]:
        """What determines the cell's compressed model (:func:`compression_key_fields`)."""
        self.statistics()  # draws the calibration
        assert self.calibration is not None
        block = {"name": method.name, "config": method.config()}
        return compression_key_fields(self.prep, self.model_info, block, ratio, self.calibration.record())

    def compression_key(self, method: Method, ratio: float) -> str:
        return run_key(self.compression_fields(method, ratio))

    # -- calibration statistics ----------------------------------------------------------------
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
        dense = source.resolve(method.statistics())
        ctx = ProbeContext(self.model, self.layout, self.calibration.input_ids, self.calibration.attention_mask,
                           self.prep.device, self.model_info, lambda i: source.load(i, dense)[0])
        return build_probes(method.probes, ctx)

    def calibration_tokens(self) -> int:
        assert self.calibration is not None
        cal = self.calibration
        return int(cal.attention_mask.sum()) if cal.attention_mask is not None else cal.input_ids.numel()

    # -- compression -----------------------------------------------------------------------------
    def compress(self, method: Method, ratio: float) -> CompressedCell:
        """Compress the model in place with ``method`` at ``ratio`` (the allocator's probes included)."""
        source = self.statistics()
        if self.prep.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.prep.device)
        stats_before = source.seconds
        t0 = time.perf_counter()
        probes = self.probes(method)
        result = compress_model(self.model, self.layout, method, ratio, source, probes=probes)
        return CompressedCell(method, ratio, result, time.perf_counter() - t0, source.seconds - stats_before, probes)

    def install_stored(self, method: Method, ratio: float) -> CompressedCell | None:
        """The cell's compressed model from the store, swapped into the dense model (no statistics,
        probes or factorization), or None when there is no store or no entry for the cell."""
        if self.store is None:
            return None
        key = self.compression_key(method, ratio)
        if not self.store.has(key):
            return None
        t0 = time.perf_counter()
        try:
            manifest, undo = self.store.install(key, self.model)
        except StoredCompressionError as exc:
            # A damaged entry is never evaluated: report it, keep it aside for inspection, recompress.
            quarantine(self.store.path(key), f"stored compression unusable ({exc}); recompressing")
            return None
        counts = manifest["record"]["counts"]
        result = CompressionResult(
            layers=manifest["record"]["layers"], params_dense=counts["params_dense"],
            params_compressed=counts["params_compressed"], params_model_dense=counts["params_model_dense"],
            params_model_compressed=counts["params_model_compressed"], numerics=manifest["record"]["numerics"],
            statistics=manifest["record"]["statistics"], undo=undo)
        return CompressedCell(method, ratio, result, time.perf_counter() - t0, 0.0, stored=manifest)

    def restore(self, cell: CompressedCell) -> None:
        """Undo :meth:`compress`: the dense model again."""
        restore(self.model, cell.result)

    @contextlib.contextmanager
    def compression_claim(self, method: Method, ratio: float) -> Iterator[None]:
        """Around compressing a cell and storing it: with a store of compressions, the cell's
        compression is claimed (:mod:`harness.work_claims`), so that a process that needs the same
        compression for other evaluations waits for it and installs it instead of recomputing it."""
        if self.store is None:
            yield
            return
        store, key = self.store, self.compression_key(method, ratio)
        store.root.mkdir(parents=True, exist_ok=True)
        claim = wait_for(store.path(key), lambda: store.has(key), f"compression {key} ({method.name} @ {ratio:g})")
        try:
            yield
        finally:
            if claim is not None:
                claim.release()

    def release_claims(self) -> None:
        """Release the statistics this process claimed and did not compute (after a failed cell)."""
        if self._statistics is not None:
            self._statistics.store.release_claims()

    # -- evaluation ------------------------------------------------------------------------------
    def references(self) -> None:
        """Dense references (e.g. embeddings) that compressed cells are compared against; once per session."""
        if self._references_done:
            return
        fits = placement(self.model, self.prep.device, self.cfg.eval_offload) == "resident"
        with (resident if fits else offloaded)(self.model, self.prep.device):
            compute_references(list(self.cfg.evals), self.model, self.tokenizer, self.settings)
        self._references_done = True

    def evaluate(self) -> Evaluated:
        """Run the evaluations with the model resident on the device, or, when it does not fit
        (:mod:`harness.engine.offload`), the streamable ones with the blocks streamed through the
        device and the others under CPU offload."""
        t0 = time.perf_counter()
        names = list(self.cfg.evals)
        device = self.prep.device
        where = placement(self.model, device, self.cfg.eval_offload)
        if where == "resident":
            with resident(self.model, device):
                metrics = run_evaluations(names, self.model, self.tokenizer, self.settings)
            return Evaluated(metrics, time.perf_counter() - t0, where)
        streamable = [n for n in names if EVALUATIONS.get(n).streamable]
        self.settings.forward = streamed_logits(self.model, self.layout, device)
        try:
            metrics = run_evaluations(streamable, self.model, self.tokenizer, self.settings)
        finally:
            self.settings.forward = None
        others = [n for n in names if n not in streamable]
        if others:
            with offloaded(self.model, device):
                metrics.update(run_evaluations(others, self.model, self.tokenizer, self.settings))
        return Evaluated({n: metrics[n] for n in names}, time.perf_counter() - t0, where)
