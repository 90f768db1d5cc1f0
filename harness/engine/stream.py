"""Streaming decoder blocks through the compute device (the GPTQ / llm-compressor sequential pattern).

For each block in turn: move it to the device, run the calibration inputs through it with hooks that
feed the declared statistics (:mod:`harness.engine.collect`), hand the block's statistics to a
callback (which may write them to the store and compress the block in place), feed its outputs to
the next block, move it back. Peak device memory is one block, its statistics and the activations.

With paired statistics the engine runs two streams: the dense model's (``X``) and the model whose
earlier blocks are already compressed (``Xh``). Both go through the dense block i, so each target
linear sees token-aligned pairs ``(x, xh)``; then the callback compresses block i and the compressed
stream advances through the compressed block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from harness.engine.capture import Batch, run_block
from harness.engine.collect import BlockCollector
from harness.engine.models import Layout
from methods import LinearStats
from methods.statistics import GramProduct, Statistic

log = logging.getLogger(__name__)


@dataclass
class BlockStatistics:
    """The statistics of one block, as a callback receives them.

    Attributes:
        index: Block index.
        linear: Module name -> :class:`LinearStats` (one shared instance per group of linears that
            read the same input).
        block: Block-scope results (name -> tensor).
        groups: Module names per distinct input.
    """

    index: int
    linear: dict[str, LinearStats]
    block: dict[str, Tensor]
    groups: list[list[str]]

    def result(self, representative: str, name: str) -> Tensor:
        """One named result of a group (``tokens`` as a tensor), for writing to the store."""
        st = self.linear[representative]
        return torch.tensor(st.tokens, dtype=torch.int64) if name == "tokens" else st.values[name]


@dataclass
class StreamReport:
    """What a streaming pass measured."""

    product: GramProduct | None = None
    product_errors: dict[str, float] = field(default_factory=dict)


def _merge(fresh: dict[str, LinearStats], loaded: dict[str, LinearStats] | None) -> dict[str, LinearStats]:
    """Per module, one LinearStats with the loaded results and the fresh ones (sharing preserved)."""
    if not loaded:
        return fresh
    merged: dict[int, LinearStats] = {}
    out = {}
    for name, st in loaded.items():
        key = id(st)
        if key not in merged:
            merged[key] = LinearStats.from_results({**st.values, "tokens": torch.tensor(st.tokens)})
        out[name] = merged[key]
    for name, st in fresh.items():
        target = out.get(name)
        if target is None:
            out[name] = st
        else:
            target.values.update(st.values)
            target.tokens = target.tokens or st.tokens
    return out


@torch.no_grad()
def stream_blocks(
    model: nn.Module,
    layout: Layout,
    batches: list[Batch],
    device: torch.device,
    statistics: list[Statistic],
    on_block: Callable[[BlockStatistics], None],
    *,
    load: Callable[[int], tuple[dict[str, LinearStats], dict[str, Tensor]]] | None = None,
    product: GramProduct | None = None,
    desc: str = "statistics",
) -> StreamReport:
    """Stream every block once (module docstring).

    Args:
        model: The model; blocks are moved to ``device`` one at a time and back.
        layout: Its layout.
        batches: Inputs of the blocks (:func:`harness.engine.capture.capture_block_inputs`); consumed:
            their hidden states are replaced block by block.
        device: Where each block runs and statistics accumulate.
        statistics: What to accumulate in this pass (dense-stream and paired; the paired stream runs
            only when one is paired).
        on_block: Called once per block with its :class:`BlockStatistics`, after the dense (and
            compressed) stream went through it and before the compressed stream advances.
        load: Statistics already stored for block i (``(linear, block)``), merged into what the
            callback receives.
        product: Gram product (None: measured on the first block's first input).
        desc: Progress-bar label.

    Returns:
        The :class:`StreamReport` (which Gram product ran).
    """
    linear_dense = [s for s in statistics if s.scope == "linear-input" and s.stream == "dense"]
    linear_paired = [s for s in statistics if s.scope == "linear-input" and s.stream == "paired"]
    block_dense = [s for s in statistics if s.scope == "block"]
    paired = bool(linear_paired)
    hats: list[Tensor] = [b.hidden for b in batches] if paired else []
    report = StreamReport(product)
    for i, block in enumerate(tqdm(layout.blocks, desc=desc, unit="block", leave=False)):
        home = next(block.parameters()).device
        block.to(device)
        collector = BlockCollector(model, layout.in_block(i), linear_dense, linear_paired, block_dense, device,
                                   report.product)
        outs = []
        for j, batch in enumerate(batches):
            collector.begin(j, "dense", batch.hidden.shape[0], batch.mask)
            out = run_block(block, batch, i)
            collector.block_io(batch.hidden, out)
            collector.end_dense()
            outs.append(out)
            if paired:
                collector.begin(j, "hat", batch.hidden.shape[0], batch.mask)
                run_block(block, batch, i, hats[j])
        if report.product is None and collector.product is not None:
            report.product, report.product_errors = collector.product, collector.product_errors
        fresh, block_results, groups = collector.finish()
        loaded_linear, loaded_block = load(i) if load is not None else ({}, {})
        on_block(BlockStatistics(i, _merge(fresh, loaded_linear), {**loaded_block, **block_results}, groups))
        if paired:
            hats = [run_block(block, b, i, h) for b, h in zip(batches, hats, strict=True)]
        for batch, out in zip(batches, outs, strict=True):
            batch.hidden = out
        block.to(home)
    return report
