"""Apply a method to a model in place: allocate -> factorize -> refine -> swap modules.

Keeps the replaced ``nn.Linear`` modules so the dense model can be restored cheaply between cells
(no deep copy of the model), and reports per-layer rank, parameters and calibration output error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harness.models import Layout, count_params, get_module, set_module
from harness.stats import Batch, DenseStats, stream_blocks
from methods import AllocationContext, LinearStats, Method, rank_for
from methods._linalg import output_energy, output_error, paired_output_error

log = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    """What compressing one model with one method at one ratio produced.

    Attributes:
        layers: Per target linear: name, block, kind, shape, rank (None = left dense), keep,
            params, calib_rel_error (``||(W - W')X||_F / ||W X||_F`` on dense calibration inputs),
            and, for methods fed compressed inputs, ``calib_rel_error_compressed``
            (``||W' Xh - W X||_F / ||W X||_F``).
        params_dense / params_compressed: Weight parameters of the target linears before / after.
        params_model_dense / params_model_compressed: All model parameters before / after.
        numerics: Layers whose whitening needed the eigenvalue fallback, and other facts.
        undo: (name, original module) pairs to restore the dense model.
    """

    layers: list[dict[str, Any]]
    params_dense: int
    params_compressed: int
    params_model_dense: int
    params_model_compressed: int
    numerics: dict[str, Any]
    undo: list[tuple[str, nn.Module]] = field(default_factory=list, repr=False)

    @property
    def achieved_ratio(self) -> float:
        return 1.0 - self.params_compressed / self.params_dense

    @property
    def achieved_ratio_model(self) -> float:
        return 1.0 - self.params_model_compressed / self.params_model_dense


def restore(model: nn.Module, result: CompressionResult) -> None:
    """Put the original dense modules back."""
    for name, module in reversed(result.undo):
        set_module(model, name, module)
    result.undo.clear()


def allocate(method: Method, layout: Layout, dense: DenseStats, ratio: float, probes: dict[str, Callable]) -> dict[str, float]:
    """Per-module keep ratios from the method's allocator, checked for completeness and range."""
    ctx = AllocationContext(layout.modules, layout.n_blocks, dense.block_cosine, dense.linear, probes)
    keeps = method.allocator.allocate(ctx, ratio)
    missing = [m.name for m in layout.modules if m.name not in keeps]
    if missing:
        raise RuntimeError(f"allocator {method.allocator.name!r} gave no keep ratio for {missing[:3]}...")
    bad = {k: v for k, v in keeps.items() if not 0.0 < v <= 1.0}
    if bad:
        raise RuntimeError(f"allocator {method.allocator.name!r} gave keep ratios outside (0, 1]: {bad}")
    return keeps


def _compress_one(
    model: nn.Module, name: str, method: Method, stats: LinearStats, keep: float, result: CompressionResult
) -> None:
    linear = get_module(model, name)
    weight = linear.weight.detach().to("cpu", torch.float64)
    m, n = weight.shape
    report: dict[str, Any] = {"name": name, "shape": [m, n], "keep": keep}
    rank = rank_for(m, n, keep)
    if rank is None:
        report.update(rank=None, params=m * n, calib_rel_error=0.0)
        result.params_compressed += m * n
        result.layers.append(report)
        return
    fact = method.factorizer.factorize(weight, stats, rank)
    fact = method.refiner.refine(weight, fact, stats)
    approx = fact.dense()
    if not torch.isfinite(approx).all():
        raise FloatingPointError(f"{method.name}: non-finite factors for {name}")
    energy = output_energy(weight, stats.gram)
    report.update(rank=fact.rank, params=fact.param_count(), calib_rel_error=output_error(weight, approx, stats.gram) / energy)
    if stats.gram_hat is not None and stats.cross is not None:
        err = paired_output_error(weight, approx, stats.gram, stats.gram_hat, stats.cross)
        report["calib_rel_error_compressed"] = err / energy
    if fact.info:
        report["info"] = fact.info
        if fact.info.get("whitening", "cholesky") != "cholesky":
            result.numerics.setdefault("whitening_fallback", []).append(name)
    new = fact.to_module(linear.bias, linear.weight.dtype, linear.weight.device)
    result.undo.append((name, set_module(model, name, new)))
    result.params_compressed += fact.param_count()
    result.layers.append(report)


def compress_model(
    model: nn.Module,
    layout: Layout,
    method: Method,
    ratio: float,
    dense: DenseStats,
    device: torch.device,
    batches: Callable[[], list[Batch]] | None = None,
    probes: dict[str, Callable] | None = None,
) -> CompressionResult:
    """Compress ``model`` in place with ``method`` at ``ratio``.

    Args:
        model: Dense model (restore with :func:`restore`).
        layout: Its layout.
        method: The resolved method.
        ratio: Fraction of target-linear parameters to remove, in (0, 1).
        dense: Dense statistics pass (Grams of the dense model, block cosines).
        device: Device for streaming when the method needs compressed-prefix inputs.
        batches: Fresh block-0 inputs (needed only by methods that need compressed-prefix inputs).
        probes: Engine measurements for allocators that run the model.

    Returns:
        The :class:`CompressionResult`.
    """
    params_model_dense = count_params(model)
    keeps = allocate(method, layout, dense, ratio, probes or {})
    result = CompressionResult([], sum(m.params for m in layout.modules), 0, params_model_dense, 0, {})
    info = {m.name: m for m in layout.modules}
    if method.needs_compressed_inputs:
        if batches is None:
            raise ValueError(f"{method.name} needs compressed-prefix inputs: pass calibration batches")

        def compress_block(index: int, stats: dict[str, LinearStats]) -> None:
            for mod in layout.in_block(index):
                _compress_one(model, mod.name, method, stats[mod.name], keeps[mod.name], result)

        # Stack-of-batch Grams (AdaSVD) are collected only for a component that asks for them.
        stack = max(int(getattr(c, "stack_of_batch", 0) or 0) for c in (method.factorizer, method.refiner))
        stream_blocks(model, layout, batches(), device, compress_block, desc=f"compress {method.name}",
                      stack_of_batch=stack)
    else:
        for mod in layout.modules:
            _compress_one(model, mod.name, method, dense.linear[mod.name], keeps[mod.name], result)
    for rep in result.layers:
        rep["block"], rep["kind"] = info[rep["name"]].block, info[rep["name"]].kind
    result.params_model_compressed = count_params(model)
    return result
