"""Apply a method to a model in place, block by block: allocate -> factorize -> refine -> swap modules.

The statistics of one block at a time are on the compute device, and the factorization runs there
(float64): host memory holds the model and its compressed factors, never all blocks' statistics.
Which passes run depends on what the method declares (:meth:`methods.Method.statistics`):

* dense statistics missing from the store and an allocator that needs only shapes: one fused pass
  computes block i's statistics, stores them, compresses block i;
* an allocator that reads calibration statistics or probes (``uses_calibration``): the missing
  statistics are stored first, then it allocates, then each block is compressed from the store;
* paired statistics (compressed-prefix inputs): one paired pass, compressing block i before the
  compressed stream goes through it, reading the stored dense statistics block by block;
* everything stored and no paired statistics: no forward pass at all, blocks are read and compressed.

Gradient-scope statistics need whole-model backward passes: when missing they are computed (and
stored) before any of the above. A factorizer that declares ``block_group = g > 1`` shares factors
across consecutive blocks: the engine then holds the statistics of the blocks ``[j g, (j + 1) g)``
until the last of them has streamed and hands the group's modules to ``factorize_blocks`` together
(memory: ``g`` blocks' statistics instead of one); everything else is unchanged.

A corrupt store file found on the way is moved aside, the partial compression undone, and the cell
recomputed once. The replaced ``nn.Linear`` modules are kept so the dense model is restored cheaply
between cells.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from harness.engine.hostmem import release_freed_memory
from harness.engine.models import Layout, count_params, get_module, set_module
from harness.engine.statistics import CalibrationStatistics
from harness.engine.store import CorruptStoreError
from harness.engine.stream import BlockStatistics, stream_blocks
from methods import AllocationContext, LinearStats, Method, ModuleInfo, rank_for
from methods._linalg import output_energy, output_error
from methods.statistics import Statistic

log = logging.getLogger(__name__)


@dataclass
class CompressionResult:
    """What compressing one model with one method at one ratio produced.

    Attributes:
        layers: Per target linear: name, block, kind, shape, rank (None = left dense), keep,
            params, calib_rel_error (``||(W - W')X||_F / ||W X||_F`` on dense calibration inputs),
            and whatever the declared statistics report about the layer (their ``report`` hook,
            e.g. the error on compressed-prefix inputs).
        params_dense / params_compressed: Weight parameters of the target linears before / after.
        params_model_dense / params_model_compressed: All model parameters before / after.
        numerics: Layers whose whitening needed the eigenvalue fallback, and other facts.
        statistics: What the engine collected (keys, shared inputs, Gram product, cache use).
        timings_s: Seconds per stage: allocation (probes included), factorization, and for the
            streamed paths the pass itself (``stream``, without the factorization inside it).
        undo: (name, original module) pairs to restore the dense model.
    """

    layers: list[dict[str, Any]]
    params_dense: int
    params_compressed: int
    params_model_dense: int
    params_model_compressed: int
    numerics: dict[str, Any]
    statistics: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    undo: list[tuple[str, nn.Module]] = field(default_factory=list, repr=False)

    @property
    def achieved_ratio(self) -> float:
        return 1.0 - self.params_compressed / self.params_dense

    @property
    def achieved_ratio_model(self) -> float:
        return 1.0 - self.params_model_compressed / self.params_model_dense

    @property
    def storage_compressed(self) -> int | None:
        """The target linears' storage in 16-bit parameter equivalents when a factorizer reports a
        storage format other than one 16-bit number per parameter (``info.storage_params``, e.g.
        Dobi-SVD's 8-bit remapped factors), other layers counted by their parameters; None when no
        layer reports one (then storage and parameters are the same count)."""
        infos = [layer.get("info") or {} for layer in self.layers]
        if not any("storage_params" in info for info in infos):
            return None
        return sum(int(info.get("storage_params", layer["params"])) for info, layer in zip(infos, self.layers, strict=True))

    def counts(self) -> dict[str, Any]:
        """Achieved ratios and parameter counts, as records and export manifests store them; with a
        storage format (:attr:`storage_compressed`) also ``storage_compressed`` and
        ``achieved_ratio_storage = 1 - storage_compressed / params_dense`` beside the parameter ratio."""
        counts: dict[str, Any] = {
            "achieved_ratio": self.achieved_ratio,
            "achieved_ratio_model": self.achieved_ratio_model,
            "params_dense": self.params_dense,
            "params_compressed": self.params_compressed,
            "params_model_dense": self.params_model_dense,
            "params_model_compressed": self.params_model_compressed,
        }
        storage = self.storage_compressed
        if storage is not None:
            counts["storage_compressed"] = storage
            counts["achieved_ratio_storage"] = 1.0 - storage / self.params_dense
        return counts


def restore(model: nn.Module, result: CompressionResult) -> None:
    """Put the original dense modules back."""
    for name, module in reversed(result.undo):
        set_module(model, name, module)
    result.undo.clear()


def allocate(method: Method, ctx: AllocationContext, ratio: float) -> dict[str, float]:
    """Per-module keep ratios from the method's allocator, checked for completeness and range."""
    keeps = method.allocator.allocate(ctx, ratio)
    missing = [m.name for m in ctx.modules if m.name not in keeps]
    if missing:
        raise RuntimeError(f"allocator {method.allocator.name!r} gave no keep ratio for {missing[:3]}...")
    bad = {k: v for k, v in keeps.items() if not 0.0 < v <= 1.0}
    if bad:
        raise RuntimeError(f"allocator {method.allocator.name!r} gave keep ratios outside (0, 1]: {bad}")
    return keeps


def compress_linear(model: nn.Module, mod: ModuleInfo, method: Method, stats: LinearStats, keep: float,
                    result: CompressionResult, device: torch.device, statistics: list[Statistic] | None = None) -> None:
    """Factorize and refine one target linear on ``device`` (float64) and swap in its low-rank module."""
    weight = get_module(model, mod.name).weight.detach().to(device=device, dtype=torch.float64)
    rank = rank_for(*weight.shape, keep)
    fact = None
    if rank is not None:
        fact = method.refiner.refine(weight, method.factorizer.factorize(weight, stats, rank), stats)
    install(model, mod, method, weight, fact, stats, keep, result, statistics)


def compress_group(model: nn.Module, mods: list[ModuleInfo], method: Method, stats: dict[str, LinearStats],
                   keeps: dict[str, float], result: CompressionResult, device: torch.device,
                   statistics: list[Statistic] | None = None) -> None:
    """Factorize the modules of a group of consecutive blocks together (a factorizer with
    ``block_group > 1``, e.g. one basis shared across blocks) and swap in their modules."""
    weights = {m.name: get_module(model, m.name).weight.detach().to(device=device, dtype=torch.float64) for m in mods}
    facts = method.factorizer.factorize_blocks([(m, weights[m.name], stats[m.name], keeps[m.name]) for m in mods])
    for m in mods:
        install(model, m, method, weights[m.name], facts.get(m.name), stats[m.name], keeps[m.name], result, statistics)


def install(model: nn.Module, mod: ModuleInfo, method: Method, weight: torch.Tensor, fact: Any, stats: LinearStats,
            keep: float, result: CompressionResult, statistics: list[Statistic] | None = None) -> None:
    """Check ``fact`` (None = leave the module dense), report its calibration error and swap it in."""
    linear = get_module(model, mod.name)
    m, n = weight.shape
    report: dict[str, Any] = {"name": mod.name, "block": mod.block, "kind": mod.kind, "shape": [m, n], "keep": keep}
    if fact is None:
        report.update(rank=None, params=m * n, calib_rel_error=0.0)
        result.params_compressed += m * n
        result.layers.append(report)
        return
    approx = fact.dense()
    if not torch.isfinite(approx).all():
        raise FloatingPointError(f"{method.name}: non-finite factors for {mod.name}")
    energy = output_energy(weight, stats.gram)
    report.update(rank=fact.rank, params=fact.param_count(), calib_rel_error=output_error(weight, approx, stats.gram) / energy)
    for stat in statistics or ():
        layer_report = getattr(stat, "report", None)
        if layer_report is not None:
            report.update(layer_report(weight, approx, stats, energy))
    if fact.info:
        report["info"] = fact.info
        if fact.info.get("whitening", "cholesky") != "cholesky":
            result.numerics.setdefault("whitening_fallback", []).append(mod.name)
    new = fact.to_module(linear.bias, linear.weight.dtype, linear.weight.device)
    result.undo.append((mod.name, set_module(model, mod.name, new)))
    result.params_compressed += fact.param_count()
    result.layers.append(report)


def _compress(model: nn.Module, layout: Layout, method: Method, ratio: float, source: CalibrationStatistics,
              probes: dict[str, Any], result: CompressionResult) -> None:
    declared = source.resolve(method.statistics())  # rules in N (stack-of-batch "paper") resolved here
    dense = [s for s in declared if s.stream == "dense"]
    paired = [s for s in declared if s.stream == "paired"]
    missing = source.missing(dense)
    result.statistics.update(collected=[s.key for s in declared], cached=[s.key for s in dense if s not in missing])
    computed_before = dict(source.pass_seconds)
    if method.allocation_uses_calibration and missing:
        source.compute(missing)  # the allocator needs every block's statistics first (counted in source.seconds)
        missing = []
    elif any(s.scope == "gradient" for s in missing):
        # Whole-model backward passes cannot be fused into the block stream: they run first.
        source.compute([s for s in missing if s.scope == "gradient"])
        missing = [s for s in missing if s.scope != "gradient"]

    t0 = time.perf_counter()
    calibrated = method.allocation_uses_calibration
    ctx = AllocationContext(
        layout.modules, layout.n_blocks, probes=probes,
        block_values=source.block_values(dense) if calibrated else None,
        load_block=(lambda i: source.load(i, dense)[0]) if calibrated else None,
        load_weight=lambda name: get_module(model, name).weight.detach().to(source.device, torch.float64),
        factorizer=method.factorizer,
    )
    keeps = allocate(method, ctx, ratio)
    result.timings_s["allocation"] = time.perf_counter() - t0

    factorize_s = 0.0
    group = method.block_group
    held: list[BlockStatistics] = []  # blocks of the current group (block_group > 1)

    def compress_block(bs: BlockStatistics) -> None:
        nonlocal factorize_s
        t = time.perf_counter()
        if group == 1:
            for mod in layout.in_block(bs.index):
                compress_linear(model, mod, method, bs.linear[mod.name], keeps[mod.name], result, source.device, declared)
        else:
            held.append(bs)
            if (bs.index + 1) % group == 0 or bs.index == layout.n_blocks - 1:
                mods = [mod for b in held for mod in layout.in_block(b.index)]
                stats = {name: st for b in held for name, st in b.linear.items()}
                compress_group(model, mods, method, stats, keeps, result, source.device, declared)
                held.clear()
        release_freed_memory()  # the block's float64 temporaries: host memory stays flat across blocks
        factorize_s += time.perf_counter() - t
        if bs.index == 0:
            kinds = {m.name: m.kind for m in layout.modules}
            result.statistics["shared_inputs"] = [[kinds[n] for n in g] for g in bs.groups]

    t0 = time.perf_counter()
    present = [s for s in dense if s not in missing]
    if paired or missing:
        write, finish = source.recorder(missing)

        def on_block(bs: BlockStatistics) -> None:
            write(bs)
            compress_block(bs)

        report = stream_blocks(model, layout, source.batches(), source.device, missing + paired, on_block,
                               load=(lambda i: source.load(i, present)) if present else None, product=source.product,
                               desc=f"compress {method.name}")
        finish(report)
        # The fused pass also streams the blocks for the missing dense statistics: their share
        # (the pass minus the factorization inside it) counts as statistics time.
        stream_s = time.perf_counter() - t0 - factorize_s
        if missing:
            source.seconds += stream_s
        result.timings_s["stream"] = stream_s
    else:
        for i in tqdm(range(layout.n_blocks), desc=f"compress {method.name}", unit="block", leave=False):
            linear, block = source.load(i, dense)
            compress_block(BlockStatistics(i, linear, block, source.groups(i)))
    result.timings_s["factorization"] = factorize_s
    result.statistics["gram_product"] = source.product_mode()
    passes = {k: v for k, v in source.pass_seconds.items() if computed_before.get(k) != v}
    if passes:  # seconds of the statistics passes this cell ran (e.g. a gradient pass)
        result.statistics["pass_seconds"] = passes


def compress_model(model: nn.Module, layout: Layout, method: Method, ratio: float, source: CalibrationStatistics,
                   probes: dict[str, Any] | None = None) -> CompressionResult:
    """Compress ``model`` in place with ``method`` at ``ratio`` (module docstring).

    Args:
        model: Dense model (restore with :func:`restore`).
        layout: Its layout.
        method: The resolved method.
        ratio: Fraction of target-linear parameters to remove, in (0, 1).
        source: The session's calibration statistics (store, calibration batches, device).
        probes: Engine measurements the allocator declared, by name.

    Returns:
        The :class:`CompressionResult`.
    """
    params_model_dense = count_params(model)
    for attempt in (1, 2):
        result = CompressionResult([], sum(m.params for m in layout.modules), 0, params_model_dense, 0, {})
        try:
            _compress(model, layout, method, ratio, source, probes or {}, result)
            break
        except CorruptStoreError as exc:
            restore(model, result)
            source.store.discard(exc)
            if attempt == 2:
                raise
            log.warning("recomputing the cell after discarding a corrupt statistics file")
    result.params_model_compressed = count_params(model)
    order = {m.name: i for i, m in enumerate(layout.modules)}
    result.layers.sort(key=lambda r: order[r["name"]])
    return result
