"""Duo-SVD module-adaptive allocation (Duo-SVD, code github.com/Pupu792/CPSVD): a KL-sensitivity multiple-choice knapsack.

Each target linear ``j`` gets one keep ratio ``p`` from a candidate set. Its cost is the stored
parameters at that keep, ``k_p (m + n)`` with ``k_p = floor(p m n / (m + n))`` (``m n`` when factoring
would not save storage), and its loss is the increase of the model's deviation when only module
``j`` moves from the base keep ``rho`` to ``p``:

    l_j(p) = D_j(p) - D_j(rho),    D_j(p) = KL(P_dense || P_{j at p, others at rho})

measured by the engine (probe ``kl_sensitivity``, see ``harness/engine/probes/kl_sensitivity.py``). Assuming the
increments add up over modules, the allocation is

    min_{p_j} sum_j l_j(p_j)   s.t.   B - slack <= sum_j cost_j(p_j) <= B

a multiple-choice knapsack, solved exactly by dynamic programming over integer costs
(:func:`solve_mckp`); costs are divided by their greatest common divisor, or rounded to a grid of
``max_states`` units when that is still too fine. ``B`` defaults to the storage of the uniform
allocation at ``rho`` (the SVD-LLM baseline), which is always feasible with loss 0, so the knapsack
never does worse than uniform on its own objective and the comparison is at equal storage.
A greedy alternative (:func:`solve_greedy`, marginal-rate with bisection on a storage price) is an option.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce
from typing import ClassVar

import torch

from methods.components import AllocationContext, ModuleInfo, check_choices, register
from methods.method import rank_for

log = logging.getLogger(__name__)

PROBE = "kl_sensitivity"


def option_cost(mod: ModuleInfo, keep: float) -> int:
    """Stored parameters of ``mod`` at ``keep``: ``k (m + n)``, or ``m n`` when left dense."""
    k = rank_for(mod.out_features, mod.in_features, keep)
    return mod.params if k is None else k * (mod.out_features + mod.in_features)


def solve_mckp(losses: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], budget: int, floor: int = 0) -> list[int]:
    """Exact multiple-choice knapsack by dynamic programming over integer costs.

    ``min sum_j losses[j][o_j]`` subject to ``floor <= sum_j costs[j][o_j] <= budget``; among equal
    losses the larger total cost wins. ``dp[b]`` holds the least loss of the modules seen so far at
    total cost exactly ``b``; one pass per module, vectorised over ``b``: O(modules x options x budget).

    Args:
        losses: Per module, the loss of each option.
        costs: Per module, the non-negative integer cost of each option.
        budget: Largest total cost.
        floor: Smallest total cost (falls back to the best total below it when none reaches it).

    Returns:
        The chosen option index per module.

    Raises:
        ValueError: when no choice fits in ``budget``.
    """
    size = budget + 1
    inf = math.inf
    dp = torch.full((size,), inf, dtype=torch.float64)
    dp[0] = 0.0
    choice = torch.zeros(len(losses), size, dtype=torch.int16)
    for j, (lj, cj) in enumerate(zip(losses, costs, strict=True)):
        new = torch.full((size,), inf, dtype=torch.float64)
        for o, (loss, cost) in enumerate(zip(lj, cj, strict=True)):
            if cost > budget:
                continue
            cand = torch.full((size,), inf, dtype=torch.float64)
            cand[cost:] = dp[: size - cost] + loss
            better = cand < new
            new = torch.where(better, cand, new)
            choice[j] = torch.where(better, torch.tensor(o, dtype=torch.int16), choice[j])
        dp = new
    finite = torch.isfinite(dp)
    if not finite.any():
        raise ValueError(f"no allocation fits in the budget {budget}")
    window = finite.clone()
    window[: max(floor, 0)] = False
    if not window.any():
        log.warning("knapsack: no allocation reaches the lower budget bound %d; using the best below it", floor)
        window = finite
    # Least loss; ties -> the larger total (flip so argmin's first hit is the largest index).
    vals = torch.where(window, dp, torch.tensor(inf, dtype=torch.float64)).flip(0)
    b = size - 1 - int(torch.argmin(vals))
    picks = [0] * len(losses)
    for j in range(len(losses) - 1, -1, -1):
        o = int(choice[j, b])
        picks[j] = o
        b -= costs[j][o]
    return picks


def solve_greedy(losses: Sequence[Sequence[float]], costs: Sequence[Sequence[int]], budget: int) -> list[int]:
    """Marginal-rate (Lagrangian) greedy for the multiple-choice knapsack.

    For a price ``lam >= 0`` on storage each module independently takes the option minimising
    ``loss + lam * cost``; the total cost falls as ``lam`` rises, and bisection finds the smallest
    ``lam`` whose allocation fits in ``budget``. Leftover budget is then spent on the upgrades with
    the best loss decrease per parameter. Optimal for the convex hull of each module's options, not
    in general; no dynamic program is needed.

    Why not ASVD's threshold rule (each module takes its cheapest option with loss <= tau): here
    every module has the same loss at the base keep (the base state's KL), so when losses fall
    with keep the threshold that fits the budget is the base loss and the rule returns the uniform
    allocation.
    """
    def pick(lam: float) -> list[int]:
        return [min(range(len(lj)), key=lambda o, lj=lj, cj=cj: (lj[o] + lam * cj[o], cj[o]))
                for lj, cj in zip(losses, costs, strict=True)]

    def total(p: list[int]) -> int:
        return sum(c[o] for c, o in zip(costs, p, strict=True))

    hi = 1.0
    spread = max(max(lj) - min(lj) for lj in losses) if losses else 0.0
    while total(pick(hi)) > budget:
        hi *= 2.0
        if hi > 1e18 * (1.0 + spread):
            raise ValueError(f"no greedy allocation fits in the budget {budget}")
    lo = 0.0
    if total(pick(lo)) > budget:
        for _ in range(100):
            mid = 0.5 * (lo + hi)
            lo, hi = (lo, mid) if total(pick(mid)) <= budget else (mid, hi)
    picks = pick(hi if total(pick(lo)) > budget else lo)
    spare = budget - total(picks)
    while True:  # fill: best loss decrease per extra parameter that still fits
        best, best_rate = None, 0.0
        for j, (lj, cj) in enumerate(zip(losses, costs, strict=True)):
            for o in range(len(lj)):
                extra, gain = cj[o] - cj[picks[j]], lj[picks[j]] - lj[o]
                if 0 < extra <= spare and gain > 0 and gain / extra > best_rate:
                    best, best_rate = (j, o), gain / extra
        if best is None:
            return picks
        spare -= costs[best[0]][best[1]] - costs[best[0]][picks[best[0]]]
        picks[best[0]] = best[1]


def candidate_keeps(base_keep: float, step: float, min_keep: float) -> list[float]:
    """``{min_keep, min_keep + step, ...} U {1} U {base_keep}``, rounded to 6 digits (sorted)."""
    count = int(math.floor((1.0 - min_keep) / step + 1e-9))
    keeps = {round(min_keep + i * step, 6) for i in range(count + 1)} | {1.0, round(base_keep, 6)}
    return sorted(k for k in keeps if 0.0 < k <= 1.0)


@register("allocator")
@dataclass(frozen=True)
class KLKnapsackAllocator:
    """Duo-SVD module-adaptive allocation (module docstring).

    Options:
        step: Spacing of the candidate keep ratios (paper: 0.1 -> {0.1, ..., 1.0}, plus ``1 - ratio``).
        min_keep: Smallest candidate keep ratio (paper: 0.1).
        n_sequences: Calibration sequences of the KL probe (paper: 32).
        solver: ``dp`` (exact) or ``greedy``.
        budget: ``uniform`` (storage of the uniform allocation, the baseline's) or ``ratio``
            (``(1 - ratio) sum m n`` exactly).
        slack: The total may fall below the budget by at most this fraction of the dense
            parameters (keeps the achieved ratio at the requested one even when losses are flat).
        max_states: Largest number of budget states of the dynamic program.
    """

    name: ClassVar[str] = "kl-knapsack"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"solver": ("dp", "greedy"), "budget": ("uniform", "ratio")}
    probes: ClassVar[tuple[str, ...]] = (PROBE,)
    uses_calibration: ClassVar[bool] = True
    step: float = 0.1
    min_keep: float = 0.1
    n_sequences: int = 32
    solver: str = "dp"
    budget: str = "uniform"
    slack: float = 0.005
    max_states: int = 100_000

    def __post_init__(self) -> None:
        check_choices(self)
        if not (0.0 < self.step <= 1.0 and 0.0 < self.min_keep <= 1.0 and self.n_sequences >= 1 and self.slack >= 0):
            raise ValueError("need 0 < step <= 1, 0 < min_keep <= 1, n_sequences >= 1, slack >= 0")

    def allocate(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        base = round(1.0 - ratio, 6)
        keeps = candidate_keeps(base, self.step, self.min_keep)
        if PROBE not in ctx.probes:
            raise RuntimeError(f"allocator {self.name!r} needs the engine probe {PROBE!r}; run it through the harness")
        table = ctx.probes[PROBE](keeps, self.n_sequences, base)
        return self.solve(ctx.modules, table, keeps, base, ratio)

    def solve(
        self, modules: Sequence[ModuleInfo], table: dict[str, dict[float, float]], keeps: Sequence[float],
        base: float, ratio: float,
    ) -> dict[str, float]:
        """Keep ratio per module from a sensitivity table ``{name: {keep: D}}`` (the knapsack)."""
        total = sum(m.params for m in modules)
        target = sum(option_cost(m, base) for m in modules) if self.budget == "uniform" else (1.0 - ratio) * total
        costs = [[option_cost(m, p) for p in keeps] for m in modules]
        losses = [[table[m.name][p] - table[m.name][base] for p in keeps] for m in modules]
        # Exact integer costs when their common divisor leaves few enough states, else a grid.
        unit: float = reduce(math.gcd, [c for row in costs for c in row])
        if total / unit > self.max_states:
            unit = total / self.max_states
        scaled = [[round(c / unit) for c in row] for row in costs]
        if self.budget == "uniform":
            b_units = sum(row[keeps.index(base)] for row in scaled)
        else:
            b_units = int(target // unit)
        floor_units = int((target - self.slack * total) // unit)
        if self.solver == "dp":
            picks = solve_mckp(losses, scaled, b_units, floor_units)
        else:
            picks = solve_greedy(losses, scaled, b_units)
        alloc = {m.name: keeps[o] for m, o in zip(modules, picks, strict=True)}
        stored = sum(costs[i][o] for i, o in enumerate(picks))
        log.info("kl-knapsack (%s) at ratio %.3f: achieved %.4f, predicted KL increase %.4g, %d of %d modules moved",
                 self.solver, ratio, 1.0 - stored / total, sum(losses[i][o] for i, o in enumerate(picks)),
                 sum(keeps[o] != base for o in picks), len(modules))
        return alloc
