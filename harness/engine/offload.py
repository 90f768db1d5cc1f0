"""Evaluating a model that does not fit on the compute device.

Two ways, chosen per evaluation:

* **Perplexity: streamed blocks.** The evaluation windows go through the model block by block, as the
  statistics pass does: the embeddings run on the device, every decoder block is moved to the device
  once and applied to all windows, then the head (final norm, LM head) runs per batch, with each
  block replaced by a stand-in that returns the final hidden states. Every block crosses the host-device
  link once per evaluation (Llama-2-70B in bfloat16: 140 GB, about 6 s at 25 GB/s), and the device
  holds one block plus the hidden states of all windows (166 windows of 2048 tokens at width 8192 in
  bfloat16: 5.6 GB). The logits are those of the whole model: same blocks, same batches.
* **Everything else (lm-eval zero-shot, embeddings, efficiency): accelerate's CPU offload.** Forward
  hooks move each module's weights to the device when it runs and back after, so every forward pass
  moves the whole model (about 6 s per batch at 70B): correct, slow, and what lm-eval's requests need.

:func:`placement` decides: ``auto`` streams when the model's weights exceed the device's free memory
(less a margin for activations), ``always`` / ``never`` force it (``always`` on the CPU runs the
streamed code path there, which is how it is tested).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from harness.engine.capture import (
    BlockStandIn,
    call_block,
    capture_block_inputs,
    outside_blocks_on,
    run_block,
)
from harness.engine.models import Layout

log = logging.getLogger(__name__)

OFFLOAD_MODES = ("auto", "never", "always")
# Fraction of the device's free memory the weights may take before evaluation streams instead.
FIT_FRACTION = 0.8


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def placement(model: nn.Module, device: torch.device, mode: str = "auto") -> str:
    """``"resident"`` (move the whole model to the device) or ``"streamed"``.

    Raises:
        ValueError: for an unknown mode.
    """
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"eval offload must be one of {OFFLOAD_MODES}, got {mode!r}")
    if mode != "auto":
        return "streamed" if mode == "always" else "resident"
    if device.type != "cuda":
        return "resident"
    free, _total = torch.cuda.mem_get_info(device)
    need = model_bytes(model)
    if need <= FIT_FRACTION * free:
        return "resident"
    log.info("the model (%.1f GB) does not fit in %.1f GB free on %s: evaluation streams blocks", need / 1e9,
             free / 1e9, device)
    return "streamed"


class _FinalHidden(BlockStandIn):
    """Stands in for every block during the head pass: returns the last block's real output for the
    current batch, so the model's own loop, final norm and head produce the logits."""

    def __init__(self, block: nn.Module, outputs: list[Any], cursor: list[int]) -> None:
        super().__init__(block)
        self._outputs, self._cursor = outputs, cursor

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return self._outputs[self._cursor[0]]


@torch.no_grad()
def streamed_logits(model: nn.Module, layout: Layout, device: torch.device) -> Callable[[Sequence[Tensor]], Iterator[Tensor]]:
    """A function from token batches ``[(B, L), ...]`` to their logits, streaming the blocks (module docstring)."""

    def forward(batches: Sequence[Tensor]) -> Iterator[Tensor]:
        ids = torch.cat(list(batches))
        sizes = [b.shape[0] for b in batches]
        captured = capture_block_inputs(model, layout, ids, device, batch_size=sizes[0])
        finals: list[Any] = []
        last = len(layout.blocks) - 1
        for i, block in enumerate(layout.blocks):
            home = next(block.parameters()).device
            block.to(device)
            for batch in captured:
                if i == last:  # keep the block's own output structure for the head pass
                    finals.append(call_block(block, batch, i))
                else:
                    batch.hidden = run_block(block, batch, i)
            block.to(home)
        cursor = [0]
        originals = list(layout.blocks)
        for i in range(len(originals)):
            layout.blocks[i] = _FinalHidden(originals[i], finals, cursor)
        try:
            with outside_blocks_on(model, layout, device):
                for j, batch in enumerate(batches):
                    cursor[0] = j
                    yield model(input_ids=batch.to(device), use_cache=False).logits
        finally:
            for i, block in enumerate(originals):
                layout.blocks[i] = block

    return forward


@contextmanager
def resident(model: nn.Module, device: torch.device) -> Iterator[None]:
    """The whole model on ``device`` for the duration (back on the CPU after)."""
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


@contextmanager
def offloaded(model: nn.Module, device: torch.device) -> Iterator[None]:
    """accelerate's CPU offload: weights visit ``device`` module by module during each forward.

    Raises:
        RuntimeError: when accelerate is not installed (names the package).
    """
    try:
        from accelerate import cpu_offload
        from accelerate.hooks import remove_hook_from_submodules
    except ImportError as exc:
        raise RuntimeError("evaluating a model larger than the device needs accelerate: pip install accelerate") from exc
    cpu_offload(model, execution_device=device)
    try:
        yield
    finally:
        remove_hook_from_submodules(model)
        model.to("cpu")
