"""SVD-LLM V2's heterogeneous compression-ratio allocation (Wang et al., arXiv 2503.12340, Sec. 3.2).

Our reading of the paper's pseudo-code, including the points its users found ambiguous (SVD-LLM
issue #46: the log of small losses, where ``r`` is computed):

1. Group the target linears by projection type (``ModuleInfo.kind``: every block's ``q_proj``
   together, every ``up_proj`` together, ...). Types are never compared with each other.
2. For each matrix ``i`` of a group, the theoretical truncation loss at the target ratio ``R``:
   ``L_i = sqrt(sum_{j > k_i} s_j^2)`` with ``s`` the singular values of ``W_i T_i`` (``T_i T_i^T =
   H_i``, the eigen whitening of :mod:`methods.eigen_whitening`) and ``k_i = floor((1 - R) m n / (m +
   n))``: exactly ``||(W_i - W_i') X_i||_F`` of its loss-optimised truncation at ``R``, computed per
   matrix (the pseudo-code's ``L_min`` inside the inner loop).
3. The paper maps losses to ratios with ``r_i = Len(L_G) x R x L_G[i] / Sum(L_G)``, ``L_G = 1 / log(L)``:
   the group's mean ratio stays ``R`` and a matrix with a larger loss is compressed less. Read
   literally, ``log`` of a loss at or below 1 is zero or negative (infinite or negative weights); we
   use ``w_i = 1 / log(L_i + offset)`` with ``offset > 1``, positive and decreasing in ``L_i``.
4. ``r_i = min(cap, c w_i)`` with ``c`` found by bisection so that the **parameter-weighted** mean
   ``sum_i p_i r_i / sum_i p_i`` equals ``R``: the literal formula whenever a group's matrices have
   one shape and none reaches the cap, and a group that removes exactly ``R`` of its parameters
   otherwise. Hence the model removes ``R`` of the target parameters (up to rank floors).

``offset`` (default 1.5) and ``cap`` (default 0.9: every matrix keeps at least 10 %) follow a
third-party implementation's reading; the paper states neither. Losses are absolute (they grow with
the number of calibration tokens; the log damps that), as in the paper.

Cost: one eigendecomposition per distinct input and one singular-value computation per target
linear, on the compute device, reading the stored statistics one block at a time.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods._linalg import Whitening
from methods.components import AllocationContext, register
from methods.eigen_whitening import stats_eigen_whitening
from methods.method import rank_for

log = logging.getLogger(__name__)


def truncation_loss(weight: Tensor, white: Whitening, k: int) -> float:
    """``sqrt(sum_{j > k} s_j^2)`` for ``s`` the singular values of ``W T`` (float64)."""
    s = torch.linalg.svdvals(weight.to(torch.float64) @ white.factor)
    return float(s[k:].pow(2).sum().sqrt())


def group_ratios(losses: Sequence[float], params: Sequence[int], ratio: float, offset: float, cap: float) -> list[float]:
    """Compression ratio per matrix of one type group (module docstring, steps 3-4).

    Args:
        losses: ``L_i >= 0`` per matrix.
        params: ``m_i n_i`` per matrix.
        ratio: Target fraction removed ``R`` (``< cap``).
        offset: ``> 1``: the weights are ``1 / log(L_i + offset)``.
        cap: Largest ratio of one matrix.

    Returns:
        ``r_i = min(cap, c w_i)`` with ``sum p_i r_i = R sum p_i``.
    """
    if not ratio <= cap:
        raise ValueError(f"target ratio {ratio} exceeds the per-matrix cap {cap}")
    w = [1.0 / math.log(loss + offset) for loss in losses]
    target = ratio * sum(params)

    def removed(c: float) -> float:
        return sum(p * min(cap, c * wi) for p, wi in zip(params, w, strict=True))

    c = target / sum(p * wi for p, wi in zip(params, w, strict=True))
    if max(c * wi for wi in w) > cap:  # some matrices saturate: shift the rest up (removed(c) is increasing)
        lo, hi = c, cap / min(w)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if removed(mid) < target else (lo, mid)
        c = hi
    return [min(cap, c * wi) for wi in w]


@register("allocator")
@dataclass(frozen=True)
class HeterogeneousAllocator:
    """SVD-LLM V2's per-type, loss-driven ratios (module docstring).

    Options:
        offset: Added to each loss before the log (> 1 keeps every weight positive and finite).
        cap: Largest compression ratio of one matrix.
    """

    name: ClassVar[str] = "heterogeneous"
    uses_calibration: ClassVar[bool] = True  # reads every module's Gram (and weight) before allocating
    offset: float = 1.5
    cap: float = 0.9

    def __post_init__(self) -> None:
        if not (self.offset > 1.0 and 0.0 < self.cap < 1.0):
            raise ValueError(f"heterogeneous needs offset > 1 and 0 < cap < 1, got {self.offset}, {self.cap}")

    def losses(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        """``L_i`` per module at ``ratio``, reading the store one block at a time."""
        if ctx.load_block is None or ctx.load_weight is None:
            raise RuntimeError(f"allocator {self.name!r} needs the stored statistics and weights; run it through the harness")
        out: dict[str, float] = {}
        for block in range(ctx.n_blocks):
            stats = ctx.load_block(block)
            for mod in (m for m in ctx.modules if m.block == block):
                k = rank_for(mod.out_features, mod.in_features, 1.0 - ratio)
                out[mod.name] = 0.0 if k is None else truncation_loss(
                    ctx.load_weight(mod.name), stats_eigen_whitening(stats[mod.name]), k)
        return out

    def allocate(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        losses = self.losses(ctx, ratio)
        kinds: dict[str, list] = {}
        for mod in ctx.modules:
            kinds.setdefault(mod.kind, []).append(mod)
        keeps: dict[str, float] = {}
        for kind, mods in kinds.items():
            ratios = group_ratios([losses[m.name] for m in mods], [m.params for m in mods], ratio, self.offset, self.cap)
            keeps.update({m.name: 1.0 - r for m, r in zip(mods, ratios, strict=True)})
            log.debug("heterogeneous %s: ratios %.3f..%.3f", kind, min(ratios), max(ratios))
        return keeps
