"""adaCR: per-block keep ratios from block importance (AdaSVD, arXiv 2502.01403, Sec. 3.2).

Paper: a layer's importance is the similarity of its input and output (Eq. (17)/(18)), normalised by
its mean over layers (Eq. (19)), and mapped linearly onto a retention ratio (Eq. (20)):

    I_n(l) = I_l / mean_l(I_l)                    (mean 1)
    CR_l   = mrr + I_n(l) (trr - mrr)             (trr = 1 - ratio, the target retention)

so ``mean_l CR_l = trr`` and CR is the retention of the factored layer, Eq. (21)
(``k (m + n) / (m n)``). Every target linear of decoder block l gets keep ``CR_l``.

What the paper leaves open, and the option that records our reading (defaults in brackets):

* ``importance`` [dissimilarity]: the sign. Eq. (18) names the similarity, but Figure 4 and the text
  say the first layer is always the most important and the LLaMA curve is bowl-shaped. On trained
  decoders the first block is the one whose output is *least* similar to its input, so ``cos`` as
  written would make it the least important; ``1 - cos`` (ShortGPT's block influence, which the paper
  cites as its inspiration) matches the figure. ``similarity`` uses ``cos``. The block's input/output
  cosine is ``AllocationContext.block_cosine`` (mean over calibration tokens).
* ``mrr_delta`` [0.1]: the band ``trr - mrr``. Table 3(d) gives Table 1's results with mrr = 0.50,
  0.40 and 0.30 at 40 %, 50 % and 60 % compression, i.e. ``trr - mrr = 0.1`` at every ratio (0.05 at
  60 % is worse, 53.17 against 50.33). ``mrr`` sets the absolute value instead.
* ``max_keep`` [1.0]: Eq. (20) is unbounded above (Figure 4 has normalised importances up to 18; on
  SmolLM2-135M block 0 gets I_n = 11.5, so CR_0 = trr + 1.05). A CR of 1 or more asks to retain at
  least every parameter of the layer, which no factorisation does more cheaply than the dense layer
  itself, so such a block stays dense (its storage is charged in full). ``max_keep < 1`` factors it
  below break-even instead (Eq. (21) and Algorithm 1 describe factored layers only); that rank drops
  about half of a square matrix's spectrum, the opposite of what Eq. (20) asks for, and measured
  worse (:attr:`AdaCRAllocator.max_keep`). ``min_keep`` [0.05] bounds the keep below.
* The budget: the paper does not say how the mean is kept when a ratio is clipped, nor for blocks of
  different sizes. Here a common shift ``c`` (``CR_l = clip(mrr + I_n(l) (trr - mrr) + c)``) is found
  by bisection so that the parameter-weighted mean keep equals trr exactly. The engine records the
  keep and rank of every linear, so the allocation is in each result record.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from methods.block_similarity import BlockCosine
from methods.components import AllocationContext, check_choices, register

log = logging.getLogger(__name__)

IMPORTANCES = ("dissimilarity", "similarity")


def block_importance(block_cosine: list[float], importance: str = "dissimilarity") -> list[float]:
    """Mean-normalised block importance ``I_n`` (module docstring).

    Args:
        block_cosine: Per block, mean ``cos(block input, block output)``.
        importance: ``dissimilarity`` (``1 - cos``) or ``similarity`` (``cos``).

    Returns:
        ``I_n`` per block, mean 1 (all ones when the raw importances do not have a positive mean).
    """
    if importance not in IMPORTANCES:
        raise ValueError(f"adacr.importance must be one of {IMPORTANCES}, got {importance!r}")
    raw = [1.0 - c if importance == "dissimilarity" else c for c in block_cosine]
    raw = [max(r, 0.0) for r in raw]  # cos in [-1, 1]; a negative similarity means "no similarity"
    mean = sum(raw) / len(raw)
    if mean <= 1e-12:
        log.warning("adacr: block importances are all ~0; falling back to uniform keep")
        return [1.0] * len(raw)
    return [r / mean for r in raw]


def _clipped(base: list[float], shift: float, lo: float, hi: float) -> list[float]:
    return [min(max(x + shift, lo), hi) for x in base]


def budgeted_keeps(
    importance_n: list[float], weights: list[float], trr: float, mrr: float, lo: float, hi: float
) -> list[float]:
    """``CR_l = clip(mrr + I_n(l) (trr - mrr) + c, lo, hi)`` with ``c`` giving weighted mean ``trr``.

    Args:
        importance_n: Mean-normalised importance per block.
        weights: Parameters of the target linears per block.
        trr: Target retention ratio (``1 - ratio``).
        mrr: Minimum retention ratio of the AdaSVD formula.
        lo: Lower clip bound.
        hi: Upper clip bound.

    Returns:
        Keep per block in ``[lo, hi]`` with ``sum w_l CR_l / sum w_l = trr`` (to 1e-12).

    Raises:
        ValueError: when ``trr`` is outside ``[lo, hi]`` (no feasible allocation).
    """
    if not lo <= trr <= hi:
        raise ValueError(f"adacr: target keep {trr:.4f} is outside the clip bounds [{lo}, {hi}]")
    base = [mrr + i * (trr - mrr) for i in importance_n]
    total = sum(weights)

    def mean_keep(shift: float) -> float:
        return sum(w * k for w, k in zip(weights, _clipped(base, shift, lo, hi), strict=True)) / total

    # mean_keep is continuous and non-decreasing in the shift; all-lo at the left end, all-hi at the right.
    left, right = lo - max(base), hi - min(base)
    for _ in range(200):
        mid = 0.5 * (left + right)
        if mean_keep(mid) < trr:
            left = mid
        else:
            right = mid
        if right - left < 1e-15:
            break
    return _clipped(base, 0.5 * (left + right), lo, hi)


@register("allocator")
@dataclass(frozen=True)
class AdaCRAllocator:
    """adaCR (module docstring: the reading of every option and the paper passage it follows).

    Attributes:
        mrr_delta: ``trr - mrr``, the band the importance spreads the keep over
            (keep_l = trr + (I_n(l) - 1) * mrr_delta before clipping). Default 0.1 (Table 3(d)).
        mrr: Absolute minimum retention ratio; overrides ``mrr_delta`` when given.
        min_keep: Lower clip bound of a block's keep.
        max_keep: Upper clip bound (default 1: a block whose CR reaches 1 stays dense). A value
            below 1 (e.g. 0.99) keeps every block factored at a rank that still saves storage; on
            SmolLM2-135M at ratio 0.2 that took ``svd-llm+adacr`` from 61.2 to 73.3 perplexity.
        importance: ``dissimilarity`` (I = 1 - cos, default) or ``similarity`` (I = cos).
    """

    name: ClassVar[str] = "adacr"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"importance": IMPORTANCES}
    uses_calibration: ClassVar[bool] = True  # reads every block's cosine before allocating
    mrr_delta: float = 0.1
    mrr: float | None = None
    min_keep: float = 0.05
    max_keep: float = 1.0
    importance: str = "dissimilarity"

    def __post_init__(self) -> None:
        if not 0.0 < self.min_keep <= self.max_keep <= 1.0:
            raise ValueError(f"adacr needs 0 < min_keep <= max_keep <= 1, got {self.min_keep}, {self.max_keep}")
        check_choices(self)

    def statistics(self) -> tuple[BlockCosine, ...]:
        return (BlockCosine(),)

    def block_keeps(self, ctx: AllocationContext, ratio: float) -> list[float]:
        """Keep ratio per decoder block at compression ``ratio``."""
        if ctx.block_cosine is None or len(ctx.block_cosine) != ctx.n_blocks:
            raise ValueError("adacr needs AllocationContext.block_cosine for every block (dense statistics pass)")
        trr = 1.0 - ratio
        mrr = self.mrr if self.mrr is not None else trr - self.mrr_delta
        weights = [0.0] * ctx.n_blocks
        for mod in ctx.modules:
            weights[mod.block] += mod.params
        imp = block_importance(list(ctx.block_cosine), self.importance)
        # Blocks without target linears carry no budget; give them weight so the mean stays defined.
        keeps = budgeted_keeps(imp, [w or 1e-30 for w in weights], trr, mrr, self.min_keep, self.max_keep)
        log.info("adacr keeps per block: %s", ", ".join(f"{k:.3f}" for k in keeps))
        return keeps

    def allocate(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        keeps = self.block_keeps(ctx, ratio)
        return {mod.name: keeps[mod.block] for mod in ctx.modules}
