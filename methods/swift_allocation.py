"""Swift-SVD's dynamic rank allocation (Qi et al., ICML 2026, arXiv 2604.01609).

Read from the official code (github hiahei/Swift-SVD, ``dynamic_rank_allocation.py``'s
``dynamic_allocation_original`` as ``run_dynamic.sh`` calls it, with the layer importance of
``llm-layer-importance/calculate_layer_importance.py``); the paper text was not reachable here. The
paper's effective rank (``utils/calculate_NER.py``) is an analysis tool there: the allocation does not
call it.

1. **Layer importance**: ShortGPT's block influence ``BI_b = 1 - mean_t cos(x_in, x_out)`` of each
   decoder block (here ``1 - block_cosine`` of :class:`methods.block_similarity.BlockCosine`),
   min-max normalised into ``[1, 2]``: ``I_b = (BI_b - min) / (max - min + 1e-6) + 1``.
2. **Energy** of each matrix: ``eps_i = sqrt(sum_j lambda_j) = ||W_i X_i||_F`` from its output
   covariance (all eigenvalues, not a truncation loss; absolute over the calibration tokens, as in
   the code, which does not divide by the token count).
3. **Score**: ``S_i = I_{b(i)}^alpha log(offset + eps_i)^(1 - alpha)``; ``run_dynamic.sh`` uses
   ``alpha = 0.6`` ("0.0 svdllmv2, 0.6 swift-svd"); the code as shipped has ``offset = 1`` (a
   commented-out line uses ``e``, labelled "our method").
4. **Per projection type** (every block's ``q_proj`` together, ...): the budget is the sum of the
   uniform ranks ``k_i = floor(keep m n / (m + n))``, ``keep = 1 - R`` (the code's
   ``int(h keep / 2)`` for square attention matrices). Each matrix first gets a base rank
   ``floor(base keep m)`` (the code's ``int(len(S) 0.25 keep)``, ``len(S) = m`` the output width);
   the rest of the type's budget is shared in proportion to ``S_i`` (``int(rest S_i / sum S)``),
   and the integer leftover goes one rank at a time to the highest scores.

So the rank sum of each type equals its uniform rank sum: for a type whose matrices share one shape
(every decoder) the allocation stores exactly the uniform allocation's parameters.

Where svdbench differs, forced by its storage accounting (the code evaluates ``W' = Q_r Q_r^T W``
densely, so any rank "counts" as ``r (m + n)``): a rank is capped at the break-even rank
``floor((m n - 1) / (m + n))`` (above it the factors would store more than the dense matrix, which
stays dense here) instead of at ``len(S)``; the base rank is at least 1 and at most ``k_i`` (the
code's base can exceed ``k_i`` when ``m > 3 n``, and then the type overshoots its budget); the
leftover is handed out in repeated passes until spent (the code makes one pass, which only differs
when caps bind). With GQA the code gives ``k_proj``/``v_proj`` the square ``q_proj`` rank; here each
type's budget is its own uniform rank sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from methods.block_similarity import BlockCosine
from methods.components import AllocationContext, ModuleInfo, register
from methods.output_covariance import output_covariance
from methods.zero_sum import keep_for_rank

log = logging.getLogger(__name__)


def block_influence_factors(block_cosine: Sequence[float]) -> list[float]:
    """``I_b = (BI_b - min BI) / (max BI - min BI + 1e-6) + 1`` in ``[1, 2)``, ``BI_b = 1 - cos_b``."""
    bi = [1.0 - c for c in block_cosine]
    lo, hi = min(bi), max(bi)
    return [(b - lo) / (hi - lo + 1e-6) + 1.0 for b in bi]


def output_energy(weight: torch.Tensor, gram: torch.Tensor) -> float:
    """``eps = sqrt(tr(W H W^T)) = ||W X||_F`` (the code's ``sqrt(sum S^2)`` of the output spectrum)."""
    return float(torch.trace(output_covariance(weight, gram)).clamp(min=0).sqrt())


def break_even_rank(mod: ModuleInfo) -> int:
    """Largest rank whose factors store fewer parameters than the dense matrix (at least 1)."""
    return max(1, (mod.params - 1) // (mod.out_features + mod.in_features))


def type_ranks(mods: Sequence[ModuleInfo], scores: Sequence[float], keep: float, base: float) -> list[int]:
    """Ranks of one projection type (module docstring, step 4).

    Args:
        mods: The type's matrices.
        scores: ``S_i > 0`` per matrix.
        keep: ``1 - R``.
        base: Base-rank fraction (the code's 0.25).

    Returns:
        Per matrix a rank in ``[1, break-even]`` whose sum is the type's uniform rank sum (less only
        when every matrix is capped).
    """
    uniform = [max(1, math.floor(keep * m.params / (m.out_features + m.in_features) + 1e-9)) for m in mods]
    caps = [break_even_rank(m) for m in mods]
    ranks = [min(max(1, math.floor(base * keep * m.out_features + 1e-9)), k, c) for m, k, c in zip(mods, uniform, caps, strict=True)]
    rest = sum(uniform) - sum(ranks)
    if rest <= 0:
        return ranks
    total = sum(scores)
    for i, s in enumerate(scores):
        ranks[i] += max(0, min(int(rest * s / (total + 1e-9)), caps[i] - ranks[i]))
    leftover = sum(uniform) - sum(ranks)
    order = sorted(range(len(mods)), key=lambda i: scores[i], reverse=True)
    while leftover > 0:
        open_ = [i for i in order if ranks[i] < caps[i]]
        if not open_:
            break
        for i in open_[:leftover]:
            ranks[i] += 1
        leftover = sum(uniform) - sum(ranks)
    return ranks


@register("allocator")
@dataclass(frozen=True)
class SwiftDynamicAllocator:
    """Swift-SVD's per-type rank allocation from layer importance and output energy (module docstring).

    Options:
        alpha: Weight of the layer importance against the energy term (``run_dynamic.sh``: 0.6;
            0 = energy only).
        offset: ``log(offset + eps)`` (the code as shipped: 1.0; its commented-out line: e).
        base: Base rank ``floor(base keep m)`` before the score-weighted share (the code's 0.25).
    """

    name: ClassVar[str] = "swift-dynamic"
    uses_calibration: ClassVar[bool] = True  # reads every module's Gram and weight and the block cosines
    alpha: float = 0.6
    offset: float = 1.0
    base: float = 0.25

    def __post_init__(self) -> None:
        if not (0.0 <= self.alpha <= 1.0 and self.offset >= 1.0 and 0.0 <= self.base <= 1.0):
            raise ValueError(f"swift-dynamic needs 0 <= alpha <= 1, offset >= 1, 0 <= base <= 1; got "
                             f"{self.alpha}, {self.offset}, {self.base}")

    def statistics(self) -> tuple[BlockCosine, ...]:
        return (BlockCosine(),)

    def energies(self, ctx: AllocationContext) -> dict[str, float]:
        """``eps_i`` per module, reading the store one block at a time."""
        return ctx.per_module(self.name, lambda mod, weight, st: output_energy(weight, st.gram))

    def scores(self, modules: Sequence[ModuleInfo], block_cosine: Sequence[float], energies: dict[str, float]) -> dict[str, float]:
        """``S_i = I_b^alpha log(offset + eps_i)^(1 - alpha)``."""
        imp = block_influence_factors(block_cosine)
        return {m.name: imp[m.block] ** self.alpha * math.log(self.offset + energies[m.name]) ** (1.0 - self.alpha)
                for m in modules}

    def solve(self, modules: Sequence[ModuleInfo], scores: dict[str, float], ratio: float) -> dict[str, float]:
        """Keep ratio per module from the scores (step 4 per projection type)."""
        kinds: dict[str, list[ModuleInfo]] = {}
        for mod in modules:
            kinds.setdefault(mod.kind, []).append(mod)
        keeps: dict[str, float] = {}
        for kind, mods in kinds.items():
            ranks = type_ranks(mods, [scores[m.name] for m in mods], 1.0 - ratio, self.base)
            keeps.update({m.name: keep_for_rank(m, r) for m, r in zip(mods, ranks, strict=True)})
            log.debug("swift-dynamic %s: ranks %d..%d", kind, min(ranks), max(ranks))
        return keeps

    def allocate(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        if ctx.block_cosine is None or len(ctx.block_cosine) != ctx.n_blocks:
            raise ValueError("swift-dynamic needs AllocationContext.block_cosine for every block (dense statistics pass)")
        return self.solve(ctx.modules, self.scores(ctx.modules, ctx.block_cosine, self.energies(ctx)), ratio)
