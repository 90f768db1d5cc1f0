"""Layer-wise streaming statistics (the GPTQ / llm-compressor sequential pattern).

1. Capture the inputs of the first block: everything outside the blocks runs on the device, a
   catcher in place of block 0 stores its arguments and stops the forward.
2. For each block in turn: move it to the device, let forward hooks on its target linears
   accumulate Gram matrices, run the calibration inputs through it, feed its outputs to the next
   block, move it back. Peak device memory is one block plus the activations.

Grams are accumulated per batch as float32 products and summed in float64, so half-precision
models do not lose precision across batches. Tokens can be excluded through a mask (padding of
encoder batches): a masked token contributes nothing to any statistic.

With ``compress_block`` the engine runs two streams: the dense model's (``X``) and the model whose
earlier blocks are already compressed (``Xh``). Both go through the dense block i, so each target
linear sees token-aligned pairs ``(x, xh)`` and the engine accumulates ``H = sum x x^T``,
``Hh = sum xh xh^T`` and ``C = sum x xh^T``; then the callback compresses block i in place and the
compressed stream advances through the compressed block.

With ``stack_of_batch=mini_bsz`` (AdaSVD's stack-of-batch, METHODS.md 4.1) the hooks also shuffle
each batch's samples with a seeded generator (the same permutation in both streams and every
block), average consecutive groups of ``mini_bsz`` samples position by position (groups may span
batches; an incomplete last group is dropped) and accumulate the Grams of the averaged samples
(``gram_stacked``, and in the paired pass ``gram_hat_stacked`` / ``cross_stacked``).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from harness.cache import save_tensor_dict
from harness.models import Layout, get_module
from methods import LinearStats

log = logging.getLogger(__name__)


class _Caught(Exception):
    def __init__(self, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.args_, self.kwargs = args, kwargs


class _Catcher(nn.Module):
    """Stands in for block 0; forwards attribute reads to it (some models read e.g. attention_type)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def __getattr__(self, name: str):  # type: ignore[override]
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args, **kwargs):  # noqa: D102
        raise _Caught(args, kwargs)


@dataclass
class Batch:
    """One batch of block inputs: hidden states plus the keyword arguments the model passed."""

    hidden: Tensor
    args: tuple
    kwargs: dict
    mask: Tensor | None = None  # (batch, seq) bool: True for tokens that count


def _to(obj, device: torch.device):
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@contextmanager
def _outside_blocks_on(model: nn.Module, layout: Layout, device: torch.device) -> Iterator[None]:
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


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    layout: Layout,
    input_ids: Tensor,
    device: torch.device,
    batch_size: int = 8,
    attention_mask: Tensor | None = None,
) -> list[Batch]:
    """Run the model up to block 0 and return its inputs, one :class:`Batch` per batch.

    Args:
        model: The (dense) model; its blocks stay where they are.
        layout: From :func:`harness.models.discover`.
        input_ids: ``(N, L)`` token ids.
        device: Where the non-block parts run.
        batch_size: Sequences per batch.
        attention_mask: ``(N, L)`` with 1 for real tokens (encoders with padding), or None.
    """
    first = layout.blocks[0]
    layout.blocks[0] = _Catcher(first)
    batches: list[Batch] = []
    try:
        with _outside_blocks_on(model, layout, device):
            for start in range(0, input_ids.shape[0], batch_size):
                ids = input_ids[start : start + batch_size].to(device)
                # No KV cache: the catcher's kwargs are replayed through every block.
                extra: dict = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}
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


@dataclass
class _Acc:
    n: int
    paired: bool
    gram: Tensor = field(init=False)
    gram_hat: Tensor | None = None
    cross: Tensor | None = None
    tokens: int = 0

    def __post_init__(self) -> None:
        self.gram = torch.zeros(self.n, self.n, dtype=torch.float64)
        if self.paired:
            self.gram_hat = torch.zeros_like(self.gram)
            self.cross = torch.zeros_like(self.gram)


@dataclass
class _Stacker:
    """Stack-of-batch Grams of one linear: averages groups of ``mini_bsz`` (shuffled) samples."""

    n: int
    mini_bsz: int
    paired: bool
    pending: list[Tensor] = field(default_factory=list)  # (seq, n) samples of the dense stream
    pending_hat: list[Tensor] = field(default_factory=list)
    gram: Tensor = field(init=False)
    gram_hat: Tensor | None = None
    cross: Tensor | None = None
    groups: int = 0

    def __post_init__(self) -> None:
        self.gram = torch.zeros(self.n, self.n, dtype=torch.float64)
        if self.paired:
            self.gram_hat = torch.zeros_like(self.gram)
            self.cross = torch.zeros_like(self.gram)

    def push(self, samples: Tensor, hat: bool) -> None:
        """Queue ``samples: (b, seq, n)`` (already permuted); accumulate every complete group."""
        (self.pending_hat if hat else self.pending).extend(samples.float().unbind(0))
        if self.paired and not hat:
            return  # groups close when the compressed stream has delivered the same samples
        while len(self.pending) >= self.mini_bsz:
            xs = torch.stack(self.pending[: self.mini_bsz]).mean(0)  # (seq, n): positions aligned
            del self.pending[: self.mini_bsz]
            self.gram += (xs.T @ xs).double().cpu()
            if self.paired:
                xh = torch.stack(self.pending_hat[: self.mini_bsz]).mean(0)
                del self.pending_hat[: self.mini_bsz]
                self.gram_hat += (xh.T @ xh).double().cpu()  # type: ignore[operator]
                self.cross += (xs.T @ xh).double().cpu()  # type: ignore[operator]
            self.groups += 1


class _GramHooks:
    """Forward hooks on a block's target linears that accumulate (paired) Gram matrices."""

    def __init__(self, model: nn.Module, names: list[str], paired: bool, stack_of_batch: int = 0) -> None:
        self.mods = {name: get_module(model, name) for name in names}
        self.acc = {name: _Acc(mod.in_features, paired) for name, mod in self.mods.items()}
        self.stack = {name: _Stacker(mod.in_features, stack_of_batch, paired)
                      for name, mod in self.mods.items()} if stack_of_batch else {}
        self.perm: Tensor | None = None  # sample permutation of the current batch (stack-of-batch)
        self.mask: Tensor | None = None
        self.mode = "dense"  # or "hat": the compressed stream, paired with the last dense batch
        self.last: dict[str, Tensor] = {}
        self.handles = [mod.register_forward_hook(self._hook(name)) for name, mod in self.mods.items()]

    def _hook(self, name: str) -> Callable:
        def hook(_mod: nn.Module, inputs: tuple, _out: Tensor) -> None:
            if self.stack:
                # (batch, seq, n) even for models that flatten tokens before a linear (OPT's fc1).
                samples = inputs[0].reshape(self.perm.shape[0], -1, inputs[0].shape[-1])  # type: ignore[union-attr]
                self.stack[name].push(samples[self.perm.to(samples.device)], hat=self.mode != "dense")  # type: ignore[union-attr]
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            if self.mask is not None:
                x = x[self.mask.reshape(-1)]
            x = x.float()
            acc = self.acc[name]
            if self.mode == "dense":
                acc.gram += (x.T @ x).double().cpu()
                acc.tokens += x.shape[0]
                if acc.paired:
                    self.last[name] = x
            else:
                acc.gram_hat += (x.T @ x).double().cpu()  # type: ignore[operator]
                acc.cross += (self.last.pop(name).T @ x).double().cpu()  # type: ignore[operator]

        return hook

    def remove(self) -> dict[str, LinearStats]:
        for h in self.handles:
            h.remove()
        out = {n: LinearStats(a.gram, a.tokens, a.gram_hat, a.cross) for n, a in self.acc.items()}
        for n, st in self.stack.items():
            out[n].gram_stacked, out[n].gram_hat_stacked, out[n].cross_stacked = st.gram, st.gram_hat, st.cross
        return out


def _masked_cosine(a: Tensor, b: Tensor, mask: Tensor | None) -> tuple[float, int]:
    cos = torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)
    if mask is not None:
        cos = cos[mask]
    return float(cos.sum()), int(cos.numel())


@dataclass
class DenseStats:
    """Result of the dense statistics pass.

    Attributes:
        linear: name -> :class:`LinearStats` (dense Gram only).
        block_cosine: per block, mean over tokens of cos(block input, block output).
        tokens: Tokens per linear (after masking).
    """

    linear: dict[str, LinearStats]
    block_cosine: list[float]
    tokens: int


@torch.no_grad()
def stream_blocks(
    model: nn.Module,
    layout: Layout,
    batches: list[Batch],
    device: torch.device,
    compress_block: Callable[[int, dict[str, LinearStats]], None] | None = None,
    desc: str = "statistics",
    stack_of_batch: int = 0,
    stack_seed: int = 0,
) -> DenseStats:
    """Stream the blocks (module docstring); with ``compress_block`` also the compressed stream.

    Args:
        model: The model; blocks are moved to ``device`` one at a time and back.
        layout: Its layout.
        batches: Inputs of block 0 from :func:`capture_block_inputs` (consumed: their hidden states
            are replaced block by block).
        device: Where each block runs.
        compress_block: ``f(block_index, stats)`` that replaces the block's linears in place.
        desc: Progress-bar label.
        stack_of_batch: ``mini_bsz`` of the stack-of-batch Grams (module docstring); 0 = off.
        stack_seed: Seed of the per-batch sample permutations.

    Returns:
        The dense statistics (Grams of the dense stream, block cosines).
    """
    paired = compress_block is not None
    hats = [b.hidden for b in batches] if paired else []
    perms: list[Tensor | None] = [None] * len(batches)
    if stack_of_batch:
        if any(b.mask is not None for b in batches):
            raise ValueError("stack_of_batch averages whole samples; it does not support masked (padded) batches")
        if sum(b.hidden.shape[0] for b in batches) < stack_of_batch:
            raise ValueError(f"stack_of_batch={stack_of_batch} exceeds the number of calibration samples")
        # One permutation per batch, shared by both streams and by every block (same groups everywhere).
        perms = [torch.randperm(b.hidden.shape[0], generator=torch.Generator().manual_seed(stack_seed * 100_003 + j))
                 for j, b in enumerate(batches)]
    all_stats: dict[str, LinearStats] = {}
    cosines: list[float] = []
    tokens = 0
    for i, block in enumerate(tqdm(layout.blocks, desc=desc, unit="block", leave=False)):
        home = next(block.parameters()).device
        block.to(device)
        hooks = _GramHooks(model, [m.name for m in layout.in_block(i)], paired, stack_of_batch)
        cos_sum, cos_n = 0.0, 0
        outs = []
        for j, batch in enumerate(batches):
            hooks.mask, hooks.perm = batch.mask, perms[j]
            hooks.mode = "dense"
            out = run_block(block, batch)
            s, n = _masked_cosine(batch.hidden, out, batch.mask)
            cos_sum, cos_n = cos_sum + s, cos_n + n
            outs.append(out)
            if paired:
                hooks.mode = "hat"
                run_block(block, batch, hats[j])
        stats = hooks.remove()
        tokens = next(iter(stats.values())).tokens
        cosines.append(cos_sum / max(cos_n, 1))
        if paired:
            compress_block(i, stats)  # type: ignore[misc]
            hats = [run_block(block, b, h) for b, h in zip(batches, hats, strict=True)]
            for st in stats.values():  # keep only the dense Gram for the caller; the rest was used
                st.gram_hat = st.cross = None
                st.gram_stacked = st.gram_hat_stacked = st.cross_stacked = None
        all_stats.update(stats)
        for batch, out in zip(batches, outs, strict=True):
            batch.hidden = out
        block.to(home)
    return DenseStats(all_stats, cosines, tokens)


STATS_VERSION = 1


def save_dense_stats(path: Path, stats: DenseStats) -> None:
    save_tensor_dict(path, {
        "version": STATS_VERSION,
        "grams": {name: (s.gram, s.tokens) for name, s in stats.linear.items()},
        "block_cosine": stats.block_cosine,
        "tokens": stats.tokens,
    })


def load_dense_stats(path: Path) -> DenseStats | None:
    """The cached statistics at ``path``, or None when absent or from another cache version."""
    if not path.is_file():
        return None
    blob = torch.load(path, weights_only=True)
    if blob.get("version") != STATS_VERSION:
        return None
    linear = {name: LinearStats(gram, tokens) for name, (gram, tokens) in blob["grams"].items()}
    log.info("statistics loaded from cache %s", path)
    return DenseStats(linear, list(blob["block_cosine"]), int(blob["tokens"]))
