"""ASVD's sensitivity-based truncation rank search (STRS; Yuan et al., arXiv 2312.05821, Sec. 3.3).

Sensitivity: for every target linear ``j`` and every candidate keep ratio ``p``, replace module ``j``
alone by its rank-``k(p)`` factorization, keep every other module dense, and measure the perplexity
``P_j(p)`` on the calibration windows. The engine probe
``asvd_sensitivity`` measures it (``harness/engine/probes/asvd_sensitivity.py``) with the method's own
factorizer, so ``svd-llm+asvd-sensitivity`` ranks modules by their whitened truncations.

Candidate grid (options ``min_keep``, ``step``, ``max_keep``): two readings exist.

* paper era: ``{0.1, 0.2, ..., 0.9}``, what the paper's experiments ran and what ASVD's code used
  until October 2024 (``min_keep=0.1``, the current default);
* official code now: ``{0.4, 0.5, ..., 0.9}``, since the authors' commit "reduce
  param_ratio_candidates" of 2024-10-22 (hahnyuan/ASVD4LLM ``sensitivity.py``; the wider grid stays
  there only for KV-cache compression): ``asvd[asvd-sensitivity.min_keep=0.4]``. With it no module
  keeps less than 40 % of its parameters.

Threshold search: list every triple ``(j, p, P_j(p))`` and sort by perplexity, highest first. A
threshold index ``t`` allows the triples at and after ``t`` (the least harmful ones); module ``j``
takes the smallest allowed keep, or stays dense when none of its triples is allowed. Storage grows
with ``t``; a binary search finds the **largest** ``t`` whose storage fits the budget
``(1 - ratio) sum m n``, i.e. the least perplexity-increasing set of choices that still compresses
at least as much as asked. ASVD's code stops its loop at this boundary but keeps the ``mid`` of its
last iteration, which can sit one triple on either side; we always take the side that fits. Storage
counts the real factor sizes ``k (m + n)`` (``floor`` ranks; ASVD's code counts ``p m n``). ASVD
also compresses ``lm_head``; the harness's targets are the block linears only.

Monotone tables (option ``monotone``; ours, on by default, in neither the paper nor the code): a
perplexity that is lower at a smaller keep than at a larger one is measurement noise (fewer
parameters cannot help), yet the literal rule then lets the module jump from dense straight to its
noisy smallest keep, so one threshold step can move the achieved ratio far past the request. With
``monotone`` each module's table is first replaced by its envelope ``P'_j(p) = max_{p' >= p} P_j(p')``
(non-increasing in ``p``): the allowed keeps of a module are then an interval up to dense, one
threshold step moves one module by one candidate step, and the achieved ratio lies above the
request by less than one candidate step of one module (plus the rank floors). Where a measured
table is monotone both rules agree on it; with noisy tables they can differ on many modules.
``monotone=false`` is the paper's and the official code's literal rule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

from methods.components import AllocationContext, ModuleInfo, register
from methods.knapsack import option_cost

log = logging.getLogger(__name__)

PROBE = "asvd_sensitivity"


def candidate_grid(step: float, min_keep: float, max_keep: float) -> list[float]:
    """``{min_keep, min_keep + step, ..., <= max_keep}`` rounded to 6 digits."""
    count = int(math.floor((max_keep - min_keep) / step + 1e-9))
    return sorted({round(min_keep + i * step, 6) for i in range(count + 1)})


def monotone_envelope(row: dict[float, float]) -> dict[float, float]:
    """``P'(p) = max_{p' >= p} P(p')``: the smallest non-increasing table above ``row``."""
    out, running = {}, -math.inf
    for p in sorted(row, reverse=True):
        running = max(running, row[p])
        out[p] = running
    return out


def threshold_keeps(modules: Sequence[ModuleInfo], table: dict[str, dict[float, float]], budget: float,
                    monotone: bool = True) -> dict[str, float]:
    """Keep per module from the largest threshold index whose storage fits ``budget`` (module docstring).

    Args:
        modules: The target linears.
        table: ``{module: {keep: perplexity}}`` (keeps below 1).
        budget: Largest total stored parameters.
        monotone: Threshold each module's :func:`monotone_envelope` instead of its raw table.

    Returns:
        ``{module: keep}`` (1.0 = dense).

    Raises:
        ValueError: when even the smallest keep of every module exceeds the budget.
    """
    rows = {m.name: {p: v for p, v in table[m.name].items() if p < 1.0} for m in modules}
    if monotone:
        rows = {name: monotone_envelope(row) for name, row in rows.items()}
    # Highest perplexity first; among equal ones the smaller keep first, so a module's allowed keeps
    # stay an interval up to dense as the threshold rises (deterministic order for ties across modules).
    triples = sorted(((v, name, p) for name, row in rows.items() for p, v in row.items()), key=lambda t: (-t[0], t[2], t[1]))
    by_name = {m.name: m for m in modules}

    def choose(t: int) -> dict[str, float]:
        keeps = {m.name: 1.0 for m in modules}
        for _, name, p in triples[t:]:
            keeps[name] = min(keeps[name], p)
        return keeps

    def stored(keeps: dict[str, float]) -> int:
        return sum(option_cost(by_name[n], k) for n, k in keeps.items())

    if stored(choose(0)) > budget:
        raise ValueError(f"no threshold fits the budget {budget:.0f}: the smallest candidate keeps are too large")
    lo, hi = 0, len(triples)  # invariant: choose(lo) fits; hi is the first index known not to fit (or the end)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if stored(choose(mid)) <= budget:
            lo = mid
        else:
            hi = mid
    return choose(lo)


@register("allocator")
@dataclass(frozen=True)
class SensitivityThresholdAllocator:
    """ASVD's STRS allocation (module docstring).

    Options:
        step: Spacing of the candidate keep ratios (paper and official code: 0.1).
        min_keep: Smallest candidate keep: 0.1 (default) is the paper-era grid 0.1..0.9 (the official
            code until 2024-10-22); 0.4 is the official code's grid 0.4..0.9 since then.
        max_keep: Largest candidate keep below dense (paper and official code: 0.9).
        n_sequences: Calibration windows of the perplexity probe (ASVD's default calibration: 32).
        monotone: Threshold each module's non-increasing envelope of its table (default true: ours,
            in neither the paper nor the code); false is the paper's and the official code's
            literal rule on the measured table.
    """

    name: ClassVar[str] = "asvd-sensitivity"
    probes: ClassVar[tuple[str, ...]] = (PROBE,)
    uses_calibration: ClassVar[bool] = True
    requires_causal_lm: ClassVar[str] = "its sensitivity is the calibration perplexity of the next-token loss"
    step: float = 0.1
    min_keep: float = 0.1
    max_keep: float = 0.9
    n_sequences: int = 32
    monotone: bool = True

    def __post_init__(self) -> None:
        if not (0.0 < self.step <= 1.0 and 0.0 < self.min_keep <= self.max_keep < 1.0 and self.n_sequences >= 1):
            raise ValueError("asvd-sensitivity needs 0 < step <= 1, 0 < min_keep <= max_keep < 1 and n_sequences >= 1")

    def allocate(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        if PROBE not in ctx.probes:
            raise RuntimeError(f"allocator {self.name!r} needs the engine probe {PROBE!r}; run it through the harness")
        if ctx.factorizer is None:
            raise RuntimeError(f"allocator {self.name!r} measures the method's factorizer; none was given")
        keeps = candidate_grid(self.step, self.min_keep, self.max_keep)
        table = ctx.probes[PROBE](keeps, self.n_sequences, ctx.factorizer)
        total = sum(m.params for m in ctx.modules)
        alloc = threshold_keeps(ctx.modules, table, (1.0 - ratio) * total, self.monotone)
        stored = sum(option_cost(m, alloc[m.name]) for m in ctx.modules)
        log.info("asvd-sensitivity at ratio %.3f: achieved %.4f, %d of %d modules dense", ratio, 1.0 - stored / total,
                 sum(k >= 1.0 for k in alloc.values()), len(alloc))
        return alloc
