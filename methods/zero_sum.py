"""ZS-SVD's global zero-sum selection of singular components (Abbasi et al., arXiv 2602.02848, ICML 2026).

Read from the official code (github mint-vu/Zero-Sum-SVD: ``compression/importance.py``,
``compression/planning.py``, ``utils/correction_utils.py``); the paper text was not reachable here.

**Sensitivities** (``compute_importance_for_layer_fast``). With SVD-LLM's whitening ``T T^T = H``
(the same :meth:`LinearStats.whitening` the ``whitened`` factorizer truncates with) and the mean
calibration gradient ``G = dL/dW`` (:mod:`methods.gradient_sum`), reparametrise ``W = A T^{-1}``:

    A = W T = U diag(s) V^T,    dL/dA = G T^{-T},    g_i = dL/ds_i = u_i^T (G T^{-T}) v_i
    delta_i = -s_i g_i                              (first order: the loss change of setting s_i = 0)

``order="second-order"`` adds the code's ``+ s_i^2 g_i^2 / 2``. Signs are kept: a component whose
removal is predicted to lower the loss has ``delta_i < 0``.

**Zero-sum rule** (``stage_plan`` with ``selection_mode="zero_sum"``). Every module offers one
candidate, its smallest kept singular value (each module still truncates its own spectrum from the
tail, so every module's factors stay SVD-LLM's optimal truncation at its rank). Candidates sit in two
min-heaps by ``|delta|``, one for ``delta >= 0`` and one for ``delta < 0``. Repeatedly: while the
running sum of accepted deltas is ``<= 0`` take the smallest-``|delta|`` positive candidate, else the
smallest negative one (the other heap when the preferred one is empty); drop it, add its delta, offer
that module's next candidate; stop once the removed parameters reach the budget ``ceil(R sum m n)``.
The running sum thus oscillates around zero. No search, no per-type quotas.

**Parameter accounting** (``effective_dense_delta_if_drop``, ``break_even_rank``, ``compute_revert_info``):
a module at rank ``r`` stores ``r (m + n)`` when that is below ``m n``, else it stays dense (``m n``).
So the first drops of a module remove nothing until its rank reaches the break-even rank
``r* = floor((m n - 1) / (m + n))``, where it saves ``m n - r* (m + n)``, then ``m + n`` per drop; a
module left above ``r*`` is restored dense (keep 1). This is exactly :func:`methods.method.rank_for`,
so the engine stores what the selection counted: the achieved ratio is ``R`` plus less than one last
step (``< max (m + n)`` parameters).

**Minimum rank** (``keep_rank_ratio``): a module never drops below ``max(1, ceil(f r*))``. The official
scripts use ``f = 0`` at ratios 0.2 and 0.4 and ``f = 0.3`` at 0.6 (their argparse default, 0.1, is
overridden by every script); ``min_rank_fraction=None`` reproduces that rule.

Out of scope: the multi-stage variant (``num_stages > 1``, re-scoring between stages), its
projected-gradient correction and the int8 ``--remap`` storage; this is the one-shot pipeline
(``scripts/run_one_shot.sh``). Cost: one SVD of ``W T`` and one triangular solve per target linear
(read one block at a time), then a heap pass over at most all singular values of the model.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods._linalg import Whitening
from methods.components import AllocationContext, LinearStats, ModuleInfo, check_choices, register
from methods.gradient_sum import GradientSum, mean_gradient

log = logging.getLogger(__name__)

ORDERS = ("first-order", "second-order")


def whitened_gradient(grad: Tensor, white: Whitening) -> Tensor:
    """``dL/dA = G T^{-T}: (m, n)`` for ``A = W T`` (float64), without forming ``T^{-1}``.

    Cholesky (lower ``T``): ``G T^{-T} = (T^{-1} G^T)^T``; eigen (``T = Q diag(r)``): ``G Q diag(1/r)``.
    """
    g = grad.to(torch.float64)
    t = white.factor.to(device=g.device, dtype=torch.float64)
    if white.method == "cholesky":
        return torch.linalg.solve_triangular(t, g.T, upper=False).T
    root = t.norm(dim=0)
    return (g @ (t / root)) / root


def singular_sensitivities(weight: Tensor, white: Whitening, grad: Tensor) -> tuple[Tensor, Tensor]:
    """Whitened singular values and their loss gradients (module docstring).

    Args:
        weight: ``W: (m, n)``.
        white: Whitening ``T: (n, n)`` of the layer's input Gram.
        grad: ``G = dL/dW: (m, n)``.

    Returns:
        ``(s, g)``, both ``(min(m, n),)`` float64, ``s`` descending, ``g_i = u_i^T G T^{-T} v_i``.

    Raises:
        FloatingPointError: on non-finite results.
    """
    a = weight.to(torch.float64) @ white.factor.to(device=weight.device, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(a, full_matrices=False)
    g = ((u.T @ whitened_gradient(grad.to(weight.device), white)) * vh).sum(dim=1)
    if not (torch.isfinite(s).all() and torch.isfinite(g).all()):
        raise FloatingPointError("non-finite whitened singular values or sensitivities")
    return s, g


def loss_changes(s: Tensor, g: Tensor, order: str = "first-order") -> Tensor:
    """Predicted loss change of dropping each component: ``-s g`` (``+ s^2 g^2 / 2`` at second order)."""
    delta = -s * g
    return delta + 0.5 * (s * g) ** 2 if order == "second-order" else delta


def stored_params(mod: ModuleInfo, rank: int) -> int:
    """``rank (m + n)`` when it saves storage, else ``m n`` (the module stays dense; :func:`rank_for`)."""
    low = rank * (mod.out_features + mod.in_features)
    return low if low < mod.params else mod.params


def min_rank(mod: ModuleInfo, fraction: float) -> int:
    """``max(1, ceil(fraction r*))`` with ``r* = floor((m n - 1) / (m + n))`` the break-even rank."""
    r_star = max(1, (mod.params - 1) // (mod.out_features + mod.in_features))
    return max(1, math.ceil(fraction * r_star - 1e-9))


@dataclass
class Selection:
    """Outcome of :func:`zero_sum_select`.

    Attributes:
        ranks: Kept rank per module name (its full rank when nothing was dropped).
        removed: Parameters removed, with :func:`stored_params`' accounting.
        running_sum: Sum of the accepted deltas (the predicted loss change).
        dropped: Number of components dropped over the model.
    """

    ranks: dict[str, int]
    removed: int
    running_sum: float
    dropped: int


def zero_sum_select(modules: Sequence[ModuleInfo], deltas: Mapping[str, Tensor], budget: int,
                    floors: Mapping[str, int]) -> Selection:
    """The two-heap zero-sum greedy (module docstring).

    Args:
        modules: The target linears.
        deltas: Per module, ``delta_i`` of each component in descending-singular-value order
            (length = its full rank).
        budget: Parameters to remove; selection stops at the first total ``>= budget``.
        floors: Per module, the smallest rank it may reach.

    Returns:
        The :class:`Selection`.

    Raises:
        ValueError: when the floors leave fewer removable parameters than ``budget``.
    """
    rank = {m.name: int(deltas[m.name].numel()) for m in modules}
    values = {m.name: deltas[m.name].tolist() for m in modules}
    info = {m.name: m for m in modules}
    heaps: tuple[list, list] = ([], [])  # (delta >= 0, delta < 0): (|delta|, counter, name, delta)
    counter = 0

    def offer(name: str) -> None:
        nonlocal counter
        if rank[name] > floors[name]:
            d = values[name][rank[name] - 1]
            heapq.heappush(heaps[0 if d >= 0 else 1], (abs(d), counter, name, d))
            counter += 1

    for m in modules:
        offer(m.name)
    removed, running, dropped = 0, 0.0, 0
    while removed < budget:
        first, other = (heaps[0], heaps[1]) if running <= 0.0 else (heaps[1], heaps[0])
        heap = first or other
        if not heap:
            raise ValueError(f"zero-sum selection: the minimum ranks leave only {removed} of the {budget} "
                             "parameters to remove; lower min_rank_fraction")
        _, _, name, d = heapq.heappop(heap)
        mod = info[name]
        before = stored_params(mod, rank[name])
        rank[name] -= 1
        removed += before - stored_params(mod, rank[name])
        running += d
        dropped += 1
        offer(name)
    return Selection(rank, removed, running, dropped)


def keep_for_rank(mod: ModuleInfo, rank: int) -> float:
    """Keep ratio that :func:`methods.method.rank_for` turns back into ``rank`` (1 = dense)."""
    if stored_params(mod, rank) >= mod.params:
        return 1.0
    return rank * (mod.out_features + mod.in_features) / mod.params


@register("allocator")
@dataclass(frozen=True)
class ZeroSumAllocator:
    """ZS-SVD's global zero-sum selection of whitened singular components (module docstring).

    Options:
        min_rank_fraction: Floor of every module's rank as a fraction of its break-even rank
            (``keep_rank_ratio``). None (default) = the official scripts' rule: 0.3 at ratios >= 0.6,
            else 0.
        order: ``first-order`` (default; the code's ``delta_order`` default, ``-s g``) or
            ``second-order`` (``-s g + s^2 g^2 / 2``).
    """

    name: ClassVar[str] = "zero-sum"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"order": ORDERS}
    uses_calibration: ClassVar[bool] = True  # reads every module's Gram, gradient and weight first
    min_rank_fraction: float | None = None
    order: str = "first-order"

    def __post_init__(self) -> None:
        check_choices(self)
        if self.min_rank_fraction is not None and not 0.0 <= self.min_rank_fraction <= 1.0:
            raise ValueError(f"zero-sum.min_rank_fraction must lie in [0, 1], got {self.min_rank_fraction}")

    def statistics(self) -> tuple[GradientSum, ...]:
        return (GradientSum(),)

    def fraction(self, ratio: float) -> float:
        """The floor fraction at ``ratio`` (the scripts' rule when ``min_rank_fraction`` is None)."""
        if self.min_rank_fraction is not None:
            return self.min_rank_fraction
        return 0.3 if ratio >= 0.6 - 1e-9 else 0.0

    def deltas(self, ctx: AllocationContext) -> dict[str, Tensor]:
        """``delta_i`` per module (descending singular values), reading the store one block at a time."""
        def delta(mod: ModuleInfo, weight: Tensor, st: LinearStats) -> Tensor:
            s, g = singular_sensitivities(weight, st.whitening(), mean_gradient(st))
            return loss_changes(s, g, self.order).cpu()

        return ctx.per_module(self.name, delta)

    def select(self, modules: Sequence[ModuleInfo], deltas: Mapping[str, Tensor], ratio: float) -> dict[str, float]:
        """Keep ratio per module from the deltas: the zero-sum selection at ``ceil(ratio sum m n)``."""
        total = sum(m.params for m in modules)
        budget = math.ceil(ratio * total - 1e-6)
        frac = self.fraction(ratio)
        sel = zero_sum_select(modules, deltas, budget, {m.name: min_rank(m, frac) for m in modules})
        log.info("zero-sum at ratio %.3f: removed %.4f, %d components dropped, predicted loss change %.4g",
                 ratio, sel.removed / total, sel.dropped, sel.running_sum)
        return {m.name: keep_for_rank(m, sel.ranks[m.name]) for m in modules}

    def allocate(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        return self.select(ctx.modules, self.deltas(ctx), ratio)
