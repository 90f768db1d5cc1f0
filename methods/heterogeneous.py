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
third-party implementation's reading; the paper states neither.

Loss scale (option ``loss``). The paper's ``L_i = ||W_i X_i - W_i' X_i||_F`` is a sum over the ``T``
calibration tokens inside a square root, so it grows like ``sqrt(T)``; because ``1 / log(L + offset)``
is not scale-free, the ratios then depend on how many tokens the user calibrated on (a module whose
loss sits near ``1 - offset`` is pushed toward the cap by a smaller calibration, and vice versa):

* ``absolute`` (current default; the paper's definition as written, with the calibration the run
  happens to have): ``L_i`` as above.
* ``per-token`` (ours): ``L_i / sqrt(T)`` = ``sqrt(sum_{j > k_i} s_j^2 / T)``, the root mean square
  over calibration tokens of the output error ``||(W_i - W_i') x_t||``, i.e. the same loss computed
  with the mean Gram ``H_i / T`` instead of the sum. It is the only normalisation of the paper's
  loss that leaves the allocation unchanged when the calibration set is repeated (``H`` and ``T``
  doubled: ``L`` grows by ``sqrt 2``; dividing by ``T`` would shrink it by ``sqrt 2`` instead), and
  it converges as the calibration grows rather than drifting with its size. ``offset`` keeps its
  meaning as a shift of the loss, on the per-token scale.

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
from methods.components import AllocationContext, LinearStats, ModuleInfo, check_choices, register
from methods.eigen_whitening import stats_eigen_whitening
from methods.method import rank_for

log = logging.getLogger(__name__)

LOSSES = ("absolute", "per-token")


def truncation_loss(weight: Tensor, white: Whitening, k: int) -> float:
    """``sqrt(sum_{j > k} s_j^2)`` for ``s`` the singular values of ``W T`` (float64)."""
    s = torch.linalg.svdvals(weight.to(torch.float64) @ white.factor)
    return float(s[k:].pow(2).sum().sqrt())


def loss_scale(stats: LinearStats, loss: str) -> float:
    """The factor that turns the absolute truncation loss into the ``loss`` reading (module docstring):
    1 for ``absolute``, ``1 / sqrt(T)`` for ``per-token`` with ``T = stats.tokens`` calibration tokens.

    Raises:
        ValueError: for ``per-token`` when the statistics carry no token count.
    """
    if loss == "absolute":
        return 1.0
    if stats.tokens <= 0:
        raise ValueError("heterogeneous.loss=per-token needs the number of calibration tokens behind each Gram "
                         "(LinearStats.tokens); these statistics carry none")
    return 1.0 / math.sqrt(stats.tokens)


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
        offset: Added to each loss before the log (> 1 keeps every weight positive and finite; the
            paper writes ``1 / log(L)``, 1.5 is a third-party reading).
        cap: Largest compression ratio of one matrix (not in the paper; a third-party reading).
        loss: Scale of the truncation loss fed to ``1 / log(L + offset)``: ``absolute`` (default; the
            paper's ``||W X - W' X||_F`` as written, which grows like the square root of the number
            of calibration tokens, so the ratios depend on the calibration size) or ``per-token``
            (ours: divided by ``sqrt(T)``, the per-token root mean square error; the allocation is
            then unchanged when the calibration is repeated).
    """

    name: ClassVar[str] = "heterogeneous"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"loss": LOSSES}
    # Records written before ``loss`` existed ran the absolute loss (methods.components.component_config).
    added_options: ClassVar[dict[str, object]] = {"loss": "absolute"}
    uses_calibration: ClassVar[bool] = True  # reads every module's Gram (and weight) before allocating
    offset: float = 1.5
    cap: float = 0.9
    loss: str = "absolute"

    def __post_init__(self) -> None:
        check_choices(self)
        if not (self.offset > 1.0 and 0.0 < self.cap < 1.0):
            raise ValueError(f"heterogeneous needs offset > 1 and 0 < cap < 1, got {self.offset}, {self.cap}")

    def losses(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        """``L_i`` per module at ``ratio`` in the ``loss`` reading, reading the store one block at a time."""
        def loss(mod: ModuleInfo, weight: Tensor, st: LinearStats) -> float:
            k = rank_for(mod.out_features, mod.in_features, 1.0 - ratio)
            return 0.0 if k is None else truncation_loss(weight, stats_eigen_whitening(st), k) * loss_scale(st, self.loss)

        return ctx.per_module(self.name, loss)

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
