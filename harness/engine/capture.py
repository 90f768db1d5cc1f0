"""Capturing the inputs of the first decoder block, and running blocks one at a time.

Everything outside the blocks (embeddings, rotary tables, final norm, head) runs on the compute
device; a stand-in in place of block 0 stores the arguments the model passes and stops the forward.
Those arguments are then replayed through every block, so no per-family code is needed.
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
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.args_, self.kwargs = args, kwargs


class _Catcher(BlockStandIn):
    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        raise _Caught(args, kwargs)


@dataclass
class Batch:
    """One batch of block inputs: hidden states plus the keyword arguments the model passed.

    Attributes:
        hidden: ``(batch, seq, d)`` hidden states entering the next block.
        args: Further positional arguments of the block call.
        kwargs: Keyword arguments (attention mask, position embeddings, ...), without any KV cache.
        mask: ``(batch, seq)`` bool, True for tokens that count (padding is False), or None.
    """

    hidden: Tensor
    args: tuple
    kwargs: dict
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
    """Run the model up to block 0 and return its inputs, one :class:`Batch` per batch (on ``device``).

    Args:
        model: The model; its blocks stay where they are.
        layout: From :func:`harness.engine.models.discover`.
        input_ids: ``(N, L)`` token ids.
        device: Where the non-block parts run and the captured inputs live.
        batch_size: Sequences per batch.
        attention_mask: ``(N, L)`` with 1 for real tokens (encoders with padding), or None.
    """
    first = layout.blocks[0]
    layout.blocks[0] = _Catcher(first)
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
                try:
                    model(input_ids=ids, **extra)
                except _Caught as caught:
                    args, kwargs = caught.args_, dict(caught.kwargs)
                    hidden = args[0] if args else kwargs.pop("hidden_states")
                    kwargs.pop("past_key_values", None)
                    kwargs.pop("past_key_value", None)
                    batches.append(Batch(hidden, tuple(args[1:]), kwargs, None if mask is None else mask.bool()))
                else:
                    raise RuntimeError("block 0 was never called: the discovered blocks are not on the forward path")
    finally:
        layout.blocks[0] = first
    return batches


def run_block(block: nn.Module, batch: Batch, hidden: Tensor | None = None) -> Tensor:
    """Output hidden states of ``block`` on ``batch`` (or on other ``hidden`` with its arguments)."""
    out = block(batch.hidden if hidden is None else hidden, *batch.args, **batch.kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out
