"""Last-layers allocator (ResSVD partial-layer compression, METHODS.md 5.2).

Under a fixed overall ratio ``c`` (fraction of all target-linear parameters removed) only the last
``L_c`` decoder blocks are compressed; earlier blocks stay dense, so no compression error enters the
residual stream before block ``L - L_c`` and none is propagated through the early blocks.

Budget equation (general, heterogeneous block sizes): with ``P_b`` the target parameters of block b
and ``S(L_c) = sum_{b >= L - L_c} P_b``, every module of a compressed block removes the same fraction

    c_block = c * sum_b P_b / S(L_c)        so that  sum_{b in last L_c} c_block P_b = c * sum_b P_b.

(For ``L`` equal blocks this is ``c L / L_c``.) Rule for ``L_c`` when it is not given: the smallest
``L_c`` with ``c_block <= cap``; the cap (default 0.8, i.e. every compressed module keeps at least
20 % of its parameters) stops ranks from collapsing. A ratio that even ``L_c = L`` cannot meet
(``c > cap``), or a given ``L_c`` that would need ``c_block > cap``, is an error raised here, before
any factorization.

Ranks are then set at integer precision: the floor rule ``k = floor(keep m n / (m + n))`` of every
module, then ``+1`` rank for modules with the largest dropped fractions while the removed total stays
at least the requested one, so the achieved ratio over all target linears matches the request to
within one rank of one module. The keep ratio returned per module encodes that rank exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from methods._linalg import rank_from_keep
from methods.components import AllocationContext, ModuleInfo, register

log = logging.getLogger(__name__)

_TOL = 1e-9  # float slack in cap comparisons (0.4 * 2 must not exceed a cap of 0.8)


@dataclass(frozen=True)
class LastLayersPlan:
    """What the allocator decided.

    Attributes:
        n_compressed: ``L_c``.
        first_block: Index of the first compressed block (``L - L_c``).
        block_removal: ``c_block``, the fraction every compressed module removes before rounding.
        ranks: Module name -> rank (compressed modules only).
        keeps: Module name -> keep ratio for every module (1.0 = dense).
        removed: Parameters removed by the ranks.
        target_removed: ``c * sum_b P_b``.
    """

    n_compressed: int
    first_block: int
    block_removal: float
    ranks: dict[str, int]
    keeps: dict[str, float]
    removed: int
    target_removed: float


def choose_n_compressed(block_params: list[int], ratio: float, cap: float) -> int:
    """Smallest ``L_c`` whose per-block removal ``ratio * sum P / S(L_c)`` is at most ``cap``.

    Raises:
        ValueError: when even compressing every block would need more than ``cap``.
    """
    total = sum(block_params)
    suffix = 0
    for lc in range(1, len(block_params) + 1):
        suffix += block_params[-lc]
        if suffix > 0 and ratio * total / suffix <= cap + _TOL:
            return lc
    raise ValueError(
        f"last-layers: ratio {ratio} cannot be met with per-block removal cap {cap}: even compressing all "
        f"{len(block_params)} blocks removes at most {cap:.3g} of the target parameters. Lower the ratio or "
        f"raise last-layers.cap (a cap near 1 leaves modules with almost no rank)."
    )


def plan_last_layers(
    modules: list[ModuleInfo], n_blocks: int, ratio: float, n_compressed: int | None = None, cap: float = 0.8
) -> LastLayersPlan:
    """Compress only the last ``L_c`` blocks so that ``ratio`` of all target parameters is removed.

    Args:
        modules: Every target linear (``block`` in ``[0, n_blocks)``).
        n_blocks: ``L``.
        ratio: Requested fraction of all target-linear parameters removed, in (0, 1).
        n_compressed: ``L_c``, or None for the smallest allowed by ``cap``.
        cap: Largest per-block removal fraction.

    Returns:
        The :class:`LastLayersPlan`.

    Raises:
        ValueError: for a ratio or ``L_c`` the cap cannot meet, or ``L_c`` outside ``[1, L]``.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must lie in (0, 1), got {ratio}")
    block_params = [0] * n_blocks
    for mod in modules:
        block_params[mod.block] += mod.params
    total = sum(block_params)
    if n_compressed is None:
        lc = choose_n_compressed(block_params, ratio, cap)
    else:
        lc = int(n_compressed)
        if not 1 <= lc <= n_blocks:
            raise ValueError(f"last-layers.blocks must lie in [1, {n_blocks}], got {n_compressed}")
    first = n_blocks - lc
    suffix = sum(block_params[first:])
    c_block = ratio * total / suffix if suffix else float("inf")
    if c_block > cap + _TOL:
        raise ValueError(
            f"last-layers: compressing the last {lc} of {n_blocks} blocks at ratio {ratio} needs per-block "
            f"removal {c_block:.3f} > cap {cap}; use more blocks (at least {choose_n_compressed(block_params, ratio, cap)}) "
            f"or raise last-layers.cap"
        )
    target = ratio * total
    keep = 1.0 - c_block
    chosen = [m for m in modules if m.block >= first]
    ranks = {m.name: rank_from_keep(m.out_features, m.in_features, keep) for m in chosen}

    def removed_by(mod: ModuleInfo, k: int) -> int:
        # A rank that does not save storage leaves the module dense (methods.method.rank_for).
        return max(0, mod.params - k * (mod.out_features + mod.in_features))

    removed = sum(removed_by(m, ranks[m.name]) for m in chosen)
    # Floor ranks remove slightly more than requested; give the surplus back one rank at a time,
    # largest dropped fraction first, never going below the requested removal.
    surplus = removed - target
    frac = {m.name: keep * m.params / (m.out_features + m.in_features) - ranks[m.name] for m in chosen}
    for mod in sorted(chosen, key=lambda m: -frac[m.name]):
        cost = mod.out_features + mod.in_features
        if cost <= surplus + _TOL and removed_by(mod, ranks[mod.name] + 1) > 0:
            ranks[mod.name] += 1
            surplus -= cost
            removed -= cost
    keeps = {m.name: 1.0 for m in modules}
    for mod in chosen:
        # Exactly rank k under the engine's floor rule (rank_from_keep adds 1e-9 before flooring).
        keeps[mod.name] = min(1.0, ranks[mod.name] * (mod.out_features + mod.in_features) / mod.params)
    log.info(
        "last-layers: compressing blocks %d..%d (L_c=%d of %d), per-block removal %.4f, achieved %.4f of %.4f",
        first, n_blocks - 1, lc, n_blocks, c_block, removed / total, ratio,
    )
    return LastLayersPlan(lc, first, c_block, ranks, keeps, removed, target)


@register("allocator")
@dataclass(frozen=True)
class LastLayersAllocator:
    """Only the last ``L_c`` blocks are compressed, uniformly, at the overall ratio (module docstring).

    Attributes:
        blocks: ``L_c``; None picks the smallest ``L_c`` allowed by ``cap``.
        cap: Largest fraction any compressed block (and module) may remove, in (0, 1).
    """

    name: ClassVar[str] = "last-layers"
    blocks: int | None = None
    cap: float = 0.8

    def __post_init__(self) -> None:
        if not 0.0 < float(self.cap) < 1.0:
            raise ValueError(f"last-layers.cap must lie in (0, 1), got {self.cap}")
        if self.blocks is not None and (not isinstance(self.blocks, int) or self.blocks < 1):
            raise ValueError(f"last-layers.blocks must be a positive integer or None, got {self.blocks!r}")

    def allocate(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        """Keep ratio per module: 1.0 before the first compressed block, encoded ranks after it."""
        return plan_last_layers(ctx.modules, ctx.n_blocks, ratio, self.blocks, float(self.cap)).keeps
