"""Feeding the declared statistics from forward hooks, one accumulator per distinct input.

Linears that read the same tensor get one accumulator: on the first batch of each block the hooks
hold every target linear's input, and linears whose inputs are the same tensor (same storage, shape
and strides, while all are held alive) form a group. The first linear of a group is its
representative; only it feeds accumulators, and on later batches the others check that they still
read the representative's tensor. On a Llama block that gives three groups (q/k/v, gate/up, down)
plus o_proj; on OPT q/k/v share; GPT-NeoX's fused qkv is one linear already.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from harness.engine.models import get_module
from methods import LinearStats, ModuleInfo
from methods.statistics import Accumulator, GramProduct, Statistic, flat_tokens

log = logging.getLogger(__name__)

# Largest relative Frobenius error of a batch Gram product, against float64, that the fast
# product may have (measured on real activations at the start of every statistics pass).
GRAM_PRODUCT_TOL = 1e-5


def _signature(x: Tensor) -> tuple[Any, ...]:
    return x.data_ptr(), tuple(x.shape), tuple(x.stride()), x.storage_offset(), x.device


def choose_gram_product(x: Tensor, tol: float = GRAM_PRODUCT_TOL, max_rows: int = 4096) -> tuple[GramProduct, dict[str, float]]:
    """The fastest Gram product whose error against float64 is at most ``tol`` on ``x``.

    Candidates, fastest first: ``half-to-float32`` (CUDA, half-precision activations), ``float32``;
    ``float64`` otherwise. The reference is the float64 product of the same activations on the same
    device (the CPU float64 path up to summation order).

    Args:
        x: ``(..., n)`` activations of one linear.
        tol: Largest accepted relative Frobenius error.
        max_rows: Rows of ``x`` used for the check.

    Returns:
        ``(product, {mode: measured relative error})``.
    """
    rows = x.reshape(-1, x.shape[-1])[:max_rows]
    exact = rows.double().T @ rows.double()
    scale = float(exact.norm()) or 1.0
    errors: dict[str, float] = {}
    modes = ["half-to-float32"] if rows.is_cuda and rows.dtype in (torch.float16, torch.bfloat16) else []
    for mode in [*modes, "float32"]:
        try:
            errors[mode] = float((GramProduct(mode)(rows, rows) - exact).norm()) / scale
        except RuntimeError as exc:  # e.g. no out_dtype kernel on this build
            log.debug("gram product %s unavailable: %s", mode, exc)
            continue
        if errors[mode] <= tol:
            return GramProduct(mode), errors
    return GramProduct("float64"), errors


class BlockCollector:
    """Forward hooks on one block's target linears that feed the declared statistics.

    Per batch the stream calls :meth:`begin` (mode ``dense`` or ``hat``), runs the block, and for the
    dense run :meth:`block_io` and :meth:`end_dense`. Paired statistics receive the dense input of a
    batch together with the compressed stream's input of the same batch.

    Args:
        model: The model (modules are looked up by name).
        modules: The block's target linears.
        linear_dense: Linear-input statistics of the dense stream.
        linear_paired: Linear-input statistics of the paired stream.
        block_dense: Block-scope statistics.
        device: Where accumulators live (the block's device).
        product: Gram product, or None to measure it on the first input (:func:`choose_gram_product`).
    """

    def __init__(self, model: nn.Module, modules: list[ModuleInfo], linear_dense: list[Statistic],
                 linear_paired: list[Statistic], block_dense: list[Statistic], device: torch.device,
                 product: GramProduct | None) -> None:
        self.names = [m.name for m in modules]
        self.linear_dense, self.linear_paired = linear_dense, linear_paired
        self.device, self.product = device, product
        self.product_errors: dict[str, float] = {}
        self.block_acc = {s.key: s.accumulator(0, device, product or GramProduct()) for s in block_dense}
        self.groups: list[list[str]] | None = None
        self.reps: dict[str, list[str]] = {}  # representative -> members
        self.member_of: dict[str, str] = {}
        self.acc: dict[str, dict[str, Accumulator]] = {}
        self.held: dict[str, tuple[Tensor, Tensor]] = {}  # batch 0: name -> (raw input, (b, s, n) view)
        self.pending: dict[str, Tensor] = {}  # dense inputs awaiting their compressed-stream pair
        self.current: dict[str, tuple[Any, ...]] = {}
        self.mode, self.batch, self.batch_size, self.mask = "dense", 0, 1, None
        self.handles = [get_module(model, n).register_forward_hook(self._hook(n)) for n in self.names]

    @property
    def active(self) -> bool:
        return bool(self.linear_dense or self.linear_paired or self.block_acc)

    def begin(self, batch: int, mode: str, batch_size: int, mask: Tensor | None) -> None:
        self.batch, self.mode, self.batch_size, self.mask = batch, mode, batch_size, mask

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(_mod: nn.Module, inputs: tuple, _out: Tensor) -> None:
            raw = inputs[0]
            x = raw.reshape(self.batch_size, -1, raw.shape[-1])  # (b, s, n) even for flattened tokens (OPT fc1)
            if self.groups is None:
                if self.mode != "dense":
                    raise RuntimeError("the compressed stream ran before the dense stream formed the input groups")
                self.held[name] = (raw, x)
                return
            rep = self.member_of[name]
            if rep != name:
                if self.mode == "dense" and self.current.get(rep) != _signature(raw):
                    raise RuntimeError(f"{name} no longer reads the same input as {rep}: input sharing changed between batches")
                return
            self.current[rep] = _signature(raw)
            self._feed(rep, x)

        return hook

    def _feed(self, rep: str, x: Tensor) -> None:
        if self.mode == "dense":
            for stat in self.linear_dense:
                self.acc[rep][stat.key].add(x, self.mask, self.batch)
            if self.linear_paired:
                self.pending[rep] = x
        else:
            dense_x = self.pending.pop(rep)
            for stat in self.linear_paired:
                self.acc[rep][stat.key].add(dense_x, self.mask, self.batch, xh=x)

    def block_io(self, x_in: Tensor, x_out: Tensor) -> None:
        """Feed block-scope statistics with the block's input and output of the current dense batch."""
        for acc in self.block_acc.values():
            acc.add(x_in, self.mask, self.batch, xh=x_out)

    def end_dense(self) -> None:
        """After the dense run of a batch: on the first batch, form the groups and feed what was held."""
        if self.groups is not None:
            return
        missing = [name for name in self.names if name not in self.held]
        if missing:
            raise RuntimeError(f"{missing} not called in the block's forward pass")
        # The representative is the first linear *called* (OPT calls q before k and v, which it
        # defines first), so later batches can check the others against it; groups are listed in
        # module order.
        by_sig: dict[tuple[Any, ...], list[str]] = {}
        for name in self.held:  # call order
            by_sig.setdefault(_signature(self.held[name][0]), []).append(name)
        order = {n: i for i, n in enumerate(self.names)}
        for called in by_sig.values():
            self.reps[called[0]] = called
            for m in called:
                self.member_of[m] = called[0]
        self.groups = sorted((sorted(c, key=order.__getitem__) for c in by_sig.values()), key=lambda g: order[g[0]])
        if self.product is None:
            first = self.held[self.groups[0][0]][1]
            self.product, self.product_errors = choose_gram_product(flat_tokens(first, self.mask))
            log.info("gram product: %s (relative errors vs float64: %s)", self.product.mode,
                     ", ".join(f"{k} {v:.1e}" for k, v in self.product_errors.items()))
        for rep in self.reps:
            n = self.held[rep][1].shape[-1]
            self.acc[rep] = {s.key: s.accumulator(n, self.device, self.product)
                             for s in (*self.linear_dense, *self.linear_paired)}
        held, self.held = self.held, {}
        for rep in self.reps:
            self.current[rep] = _signature(held[rep][0])
            self._feed(rep, held[rep][1])

    def finish(self) -> tuple[dict[str, LinearStats], dict[str, Tensor], list[list[str]]]:
        """Remove the hooks; return per-module statistics (shared per group), block-scope results
        and the groups."""
        for h in self.handles:
            h.remove()
        if self.pending:
            raise RuntimeError(f"dense inputs of {sorted(self.pending)} never met their compressed-stream pair")
        linear: dict[str, LinearStats] = {}
        for rep, members in self.reps.items():
            results: dict[str, Tensor] = {}
            for acc in self.acc[rep].values():
                results.update(acc.result())
            stats = LinearStats.from_results(results)
            for m in members:
                linear[m] = stats
        block: dict[str, Tensor] = {}
        for acc in self.block_acc.values():
            block.update(acc.result())
        return linear, block, self.groups or [[n] for n in self.names]
