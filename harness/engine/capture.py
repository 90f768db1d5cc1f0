"""Capturing the inputs of the decoder blocks, and running blocks one at a time.

Everything outside the blocks (embeddings, rotary tables, masks, final norm, head) runs on the compute
device; stand-ins in place of the blocks store the arguments the model passes each of them, and the
last one stops the forward before the head. Block 0's hidden states and every block's own further
arguments are then replayed block by block, so no per-family code is needed.

The arguments are recorded per block because they may differ between blocks: Gemma 3 (and Qwen2
with sliding layers) hands each block the attention mask and the rotary table of its attention type
(sliding-window local or global), chosen in the model's own loop. Blocks of one type receive the
same tensor objects, so holding every block's arguments costs one reference per block, not one copy.
The stand-ins do not run the blocks: each returns its input unchanged. That records the right
arguments for models that compute them before their loop, as every supported family does; one that
derived them from a block's output would fail the streamed-versus-resident tests
(tests/integration/test_gemma3_engine.py, test_engine.py).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from harness.engine.models import Layout


class BlockStandIn(nn.Module):
    """Base of modules that stand in for a decoder block: attribute reads fall through to the real
    block (some models read per-layer attributes such as ``attention_type`` from their blocks)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def __getattr__(self, name: str):  # type: ignore[override]
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


class _Caught(Exception):
    """Raised in place of the last block: the capture has every block's arguments and stops there."""


class _Recorder(BlockStandIn):
    """Stands in for a block during capture: records the arguments of its call in ``calls``; returns
    the hidden states unchanged (the next block's arguments are what is wanted, not its input), or, in
    place of the last block, stops the forward before the final norm and head."""

    def __init__(self, block: nn.Module, calls: list[tuple[tuple, dict]], last: bool) -> None:
        super().__init__(block)
        self._calls, self._last = calls, last

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        self._calls.append((args, kwargs))
        if self._last:
            raise _Caught
        return args[0] if args else kwargs["hidden_states"]


# Keyword arguments never replayed: the hidden states travel separately, and there is no KV cache.
_NOT_REPLAYED = ("hidden_states", "past_key_values", "past_key_value")


@dataclass
class Batch:
    """One batch of block inputs: hidden states plus the further arguments the model passes each block.

    Attributes:
        hidden: ``(batch, seq, d)`` hidden states entering the next block.
        calls: Per block index: ``(further positional arguments, keyword arguments)`` of its call
            (attention mask, position embeddings, ...), without the hidden states or any KV cache.
        mask: ``(batch, seq)`` bool, True for tokens that count (padding is False), or None.
    """

    hidden: Tensor
    calls: list[tuple[tuple, dict]]
    mask: Tensor | None = None


def move(obj: Any, device: torch.device | str) -> Any:
    """``obj`` with every tensor inside tuples, lists and dicts moved to ``device``."""
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(move(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    return obj


@contextmanager
def outside_blocks_on(model: nn.Module, layout: Layout, device: torch.device) -> Iterator[None]:
    """Move every parameter and buffer outside the blocks to ``device`` for the duration."""
    block_ids = {id(p) for p in layout.blocks.parameters()} | {id(b) for b in layout.blocks.buffers()}
    moved: list[tuple[Tensor, torch.device]] = []
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in block_ids and t.device != device:
            moved.append((t, t.device))
            t.data = t.data.to(device)
    try:
        yield
    finally:
        for t, dev in moved:
            t.data = t.data.to(dev)


def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    # No KV cache: the captured arguments are replayed through every block.
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    layout: Layout,
    input_ids: Tensor,
    device: torch.device,
    batch_size: int = 8,
    attention_mask: Tensor | None = None,
) -> list[Batch]:
    """Run the model up to its blocks and return their inputs, one :class:`Batch` per batch (on ``device``).

    The blocks themselves do not run (module docstring); the cost is the embeddings and whatever the
    model computes before its loop.

    Args:
        model: The model; its blocks stay where they are.
        layout: From :func:`harness.engine.models.discover`.
        input_ids: ``(N, L)`` token ids.
        device: Where the non-block parts run and the captured inputs live.
        batch_size: Sequences per batch.
        attention_mask: ``(N, L)`` with 1 for real tokens (encoders with padding), or None.
    """
    originals = list(layout.blocks)
    calls: list[tuple[tuple, dict]] = []
    for i, block in enumerate(originals):
        layout.blocks[i] = _Recorder(block, calls, last=i == len(originals) - 1)
    batches: list[Batch] = []
    try:
        with outside_blocks_on(model, layout, device):
            for start in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[start : start + batch_size].to(device)
                extra = _forward_kwargs(model)
                mask = None
                if attention_mask is not None:
                    mask = attention_mask[start : start + batch_size].to(device)
                    extra["attention_mask"] = mask
                calls.clear()
                try:
                    model(input_ids=ids, **extra)
                except _Caught:
                    pass
                else:
                    raise RuntimeError("the last block was never called: the discovered blocks are not the model's "
                                       "forward path")
                if len(calls) != len(originals):
                    raise RuntimeError(f"the model called its {len(originals)} blocks {len(calls)} times in one forward")
                args, kwargs = calls[0]
                hidden = args[0] if args else kwargs["hidden_states"]
                batches.append(Batch(hidden, [_replayed(a, k) for a, k in calls], None if mask is None else mask.bool()))
    finally:
        for i, block in enumerate(originals):
            layout.blocks[i] = block
    return batches


def _replayed(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """The arguments of one recorded block call that are replayed: all but the hidden states and the cache."""
    return tuple(args[1:]), {k: v for k, v in kwargs.items() if k not in _NOT_REPLAYED}


def call_block(block: nn.Module, batch: Batch, index: int, hidden: Tensor | None = None) -> Any:
    """The raw output of ``block`` (at ``index`` in the block list) on ``batch``, or on other ``hidden``
    with ``batch``'s arguments for that block."""
    args, kwargs = batch.calls[index]
    return block(batch.hidden if hidden is None else hidden, *args, **kwargs)


def run_block(block: nn.Module, batch: Batch, index: int, hidden: Tensor | None = None) -> Tensor:
    """Output hidden states of ``block`` (at ``index``) on ``batch`` (or on other ``hidden``)."""
    out = call_block(block, batch, index, hidden)
    return out[0] if isinstance(out, (tuple, list)) else out
