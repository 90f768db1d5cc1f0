"""The dense calibration statistics of one loaded model and calibration, computed on demand.

A method declares statistics (:mod:`methods.statistics`); dense-stream ones are computed at most once
per (model weights, dtype, calibration tokens) and kept in the on-disk store
(:mod:`harness.engine.store`), which every method, ratio, cell and executor then reads one block at a
time. Paired statistics depend on the method and are computed while compressing
(:mod:`harness.engine.compress`). Gradient-scope statistics come from whole-model backward passes
(:mod:`harness.engine.gradients`) and are stored per block like the others, one entry per module.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from harness.engine.capture import Batch
from harness.engine.gradients import gradient_pass
from harness.engine.models import Layout
from harness.engine.store import StatsStore, StoreWriter
from harness.engine.stream import BlockStatistics, StreamReport, stream_blocks
from methods import LinearStats
from methods.statistics import GramProduct, InputGram, Statistic, for_samples

log = logging.getLogger(__name__)


class CalibrationStatistics:
    """Stored dense statistics of one model and calibration.

    Args:
        model: The dense model.
        layout: Its layout.
        batches: Returns fresh block inputs of the calibration windows (on ``device``; see
            :func:`harness.engine.capture.capture_block_inputs`).
        device: The compute device.
        store: The store of this (model, dtype, calibration) identity.
        identity: JSON-able identity written into every index (model hash, dtype, token hash).
        windows: ``(input_ids (N, L), attention_mask or None)`` of the calibration, for statistics
            that need whole-model passes (gradients); None when the session has none to give.
    """

    def __init__(self, model: nn.Module, layout: Layout, batches: Callable[[], list[Batch]], device: torch.device,
                 store: StatsStore, identity: dict[str, Any],
                 windows: tuple[Tensor, Tensor | None] | None = None) -> None:
        self.model, self.layout, self.batches, self.device = model, layout, batches, device
        self.store, self.identity, self.windows = store, identity, windows
        self.product: GramProduct | None = None
        self.product_errors: dict[str, float] = {}
        self.computed: list[str] = []  # statistic keys computed (not read from the cache) in this process
        self.seconds = 0.0  # time spent in dense statistics passes
        self.pass_seconds: dict[str, float] = {}  # statistic keys -> seconds of the pass that computed them

    @classmethod
    def in_directory(cls, model: nn.Module, layout: Layout, batches: Callable[[], list[Batch]], device: torch.device,
                     root: Path, windows: tuple[Tensor, Tensor | None] | None = None) -> CalibrationStatistics:
        """Statistics stored under ``root`` (tests and tools that manage their own directory)."""
        return cls(model, layout, batches, device, StatsStore(root, layout.n_blocks), {"root": str(root)}, windows)

    def load_all(self, statistics: list[Statistic] | None = None) -> dict[str, LinearStats]:
        """Every module's stored statistics at once (computing missing ones): holds all blocks in
        memory, so it is for small models, tests and reports, never the compression path."""
        statistics = statistics or [InputGram()]
        self.compute(self.missing(statistics))
        out: dict[str, LinearStats] = {}
        for i in range(self.layout.n_blocks):
            out.update(self.load(i, statistics)[0])
        return out

    def product_mode(self) -> str | None:
        """The Gram product the dense statistics were accumulated with (measured in this process, or
        read from the store's index when they came from the cache)."""
        if self.product is not None:
            return self.product.mode
        index = self.store.directory(InputGram().key).index
        return None if index is None else index.get("gram_product")

    def n_samples(self) -> int:
        """``N``, the calibration samples (windows): from the token ids, else counted in the block inputs."""
        if self.windows is not None:
            return int(self.windows[0].shape[0])
        return sum(int(b.hidden.shape[0]) for b in self.batches())

    def resolve(self, statistics: list[Statistic]) -> list[Statistic]:
        """``statistics`` with the options that depend on ``N`` resolved for this calibration
        (:func:`methods.statistics.for_samples`, e.g. AdaSVD's stack-of-batch rule ``ceil(N / 32)``)."""
        if not any(getattr(s, "depends_on_samples", False) for s in statistics):
            return list(statistics)  # N is not needed (counting it may mean capturing the block inputs)
        return for_samples(list(statistics), self.n_samples())

    # -- what is stored ----------------------------------------------------------------------------
    def missing(self, statistics: list[Statistic]) -> list[Statistic]:
        """The dense-stream statistics among ``statistics`` that are not (validly) stored."""
        return [s for s in statistics if s.stream == "dense" and not self.store.complete(s.key)]

    def groups(self, block: int) -> list[list[str]]:
        """Module names per distinct input of ``block`` (from the stored dense Gram)."""
        return self.store.groups("gram", block)

    def block_values(self, statistics: list[Statistic]) -> list[dict[str, float]]:
        """Per block, the scalar results of the stored block-scope statistics among ``statistics``."""
        out: list[dict[str, float]] = [{} for _ in range(self.layout.n_blocks)]
        for stat in statistics:
            if stat.scope == "block" and stat.stream == "dense":
                for i, values in enumerate(self.store.block_values(stat.key)):
                    out[i].update(values)
        return out

    def load(self, block: int, statistics: list[Statistic]) -> tuple[dict[str, LinearStats], dict[str, Tensor]]:
        """The stored dense statistics of ``block`` on the device: per module (one shared
        :class:`LinearStats` per group) and block-scope results.

        Raises:
            harness.engine.store.CorruptStoreError: when a file fails verification.
        """
        per_rep: dict[str, dict[str, Tensor]] = {}
        per_module: dict[str, dict[str, Tensor]] = {}  # gradient scope: one entry per weight
        block_results: dict[str, Tensor] = {}
        inputs = [s for s in statistics if s.stream == "dense" and s.scope == "linear-input"]
        for stat in statistics:
            if stat.stream != "dense":
                continue
            for name, tensor in self.store.read(stat.key, block, self.device).items():
                owner, _, result = name.partition("::")
                if owner == "block":
                    block_results[result] = tensor
                else:
                    (per_module if stat.scope == "gradient" else per_rep).setdefault(owner, {})[result] = tensor
        linear: dict[str, LinearStats] = {}
        for members in self.store.groups(inputs[0].key, block) if inputs else []:
            if members[0] in per_rep:
                stats = LinearStats.from_results(per_rep[members[0]])
                for m in members:
                    linear[m] = stats
        for name, extra in per_module.items():
            shared = linear.get(name)
            linear[name] = shared.derive(extra) if shared is not None else LinearStats.from_results(extra)
        return linear, block_results

    # -- computing ---------------------------------------------------------------------------------
    def recorder(self, statistics: list[Statistic]) -> tuple[Callable[[BlockStatistics], None], Callable[[StreamReport], None]]:
        """``(on_block, finish)`` that write the dense ``statistics`` of every streamed block to the store."""
        writers: dict[str, tuple[Statistic, StoreWriter]] = {s.key: (s, self.store.writer(s.key)) for s in statistics}

        def on_block(bs: BlockStatistics) -> None:
            for stat, writer in writers.values():
                tensors: dict[str, Tensor] = {}
                values: dict[str, float] = {}
                if stat.scope == "block":
                    for name in stat.names:
                        tensors[f"block::{name}"] = bs.block[name]
                        values[name] = float(bs.block[name])
                else:
                    for members in bs.groups:
                        for name in stat.names:
                            tensors[f"{members[0]}::{name}"] = bs.result(members[0], name)
                writer.write(bs.index, tensors, bs.groups, values)

        def finish(report: StreamReport) -> None:
            if report.product is not None:
                self.product, self.product_errors = report.product, report.product_errors
            meta = {"identity": self.identity, "gram_product": self.product.mode if self.product else None,
                    "gram_product_errors": self.product_errors}
            for _, writer in writers.values():
                writer.finish(meta)
            self.computed.extend(writers)

        return on_block, finish

    def compute_gradients(self, statistics: list[Statistic]) -> None:
        """Whole-model forward + backward passes (:mod:`harness.engine.gradients`) that store the
        gradient-scope ``statistics``, one entry per target linear in each block's file."""
        if self.windows is None:
            raise RuntimeError("gradient statistics need the calibration windows (token ids); "
                               "this CalibrationStatistics was built without them")
        t0 = time.perf_counter()
        ids, mask = self.windows
        per_block = gradient_pass(self.model, self.layout, ids, mask, self.device, statistics)
        seconds = time.perf_counter() - t0
        for stat in statistics:
            writer = self.store.writer(stat.key)
            for i, modules in enumerate(per_block):
                tensors = {f"{name}::{r}": results[r] for name, results in modules.items() for r in stat.names}
                writer.write(i, tensors, [[name] for name in modules], {})
            writer.finish({"identity": self.identity, "windows": int(ids.shape[0]), "seconds": seconds})
            self.computed.append(stat.key)
            self.pass_seconds[stat.key] = seconds
        self.seconds += seconds
        log.info("statistics %s: %d windows forward + backward in %.1f s", ", ".join(s.key for s in statistics),
                 ids.shape[0], seconds)

    def compute(self, statistics: list[Statistic]) -> None:
        """Dense passes that store ``statistics`` (nothing else happens to the model): the gradient
        pass for gradient-scope ones, one streamed pass for the rest."""
        gradients = [s for s in statistics if s.scope == "gradient"]
        if gradients:
            self.compute_gradients(gradients)
        statistics = [s for s in statistics if s.scope != "gradient"]
        if not statistics:
            return
        t0 = time.perf_counter()
        on_block, finish = self.recorder(statistics)
        report = stream_blocks(self.model, self.layout, self.batches(), self.device, statistics, on_block,
                               product=self.product)
        finish(report)
        self.seconds += time.perf_counter() - t0
        self.pass_seconds.update({s.key: time.perf_counter() - t0 for s in statistics})
        log.info("statistics %s: %d blocks in %.1f s", ", ".join(s.key for s in statistics), self.layout.n_blocks,
                 time.perf_counter() - t0)
