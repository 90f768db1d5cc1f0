"""FWSVD, Fisher-weighted SVD (Hsu et al., arXiv 2207.00112): ``fwsvd`` = uniform + fisher-weighted.

The paper's objective weighs the reconstruction error of each weight by its Fisher information,
``min ||sqrt(I) * (W - A B)||_F`` (element-wise), which has no closed form; it then assumes every
weight in a **row** shares one importance (Sec. 3.2), ``I_i = sum_j I_{ij}``, which turns it into

    min || D (W - A B) ||_F,   D = diag(sqrt(I_1), ..., sqrt(I_m))
    D W = U S V^T,   A = D^{-1} U_k S_k^{1/2},   B = S_k^{1/2} V_k^T

solved by one SVD. The paper writes the layer as ``y = W x``, so its row is an **output** feature of
our ``(m, n)`` weight: ``axis="rows"`` (default) is the paper's weighting. ``axis="inputs"`` weighs
input columns instead (``W D``, undone on ``V``), the variant that ASVD's code calls ``fisher`` and
that several LLM re-implementations use; the choice changes results.

Weights are divided by their maximum before the square root (uniform Fisher gives ``D = I`` exactly:
plain SVD bit for bit) and floored at ``FISHER_FLOOR`` so that rows without gradient (e.g. underflow
in float16) keep ``D`` invertible. A non-finite factor is an error. Rank: uniform, ``floor(keep m n
/ (m + n))``, as in the paper. Needs a causal LM (squared gradients of the next-token loss); the
statistic costs one forward and one backward of the whole model per calibration window, with the
whole model on the compute device (``harness/engine/gradients.py``), and is cached like the Grams.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods._linalg import diag_scaled_truncate
from methods.components import LinearStats, check_choices, register
from methods.fisher import SquaredGradients
from methods.lowrank import Factorization
from methods.method import register_method

FISHER_FLOOR = 1e-8  # relative floor of the importances before the square root
AXES = ("rows", "inputs")


def fisher_scale(importance: Tensor) -> Tensor:
    """``d = sqrt(max(I / max(I), FISHER_FLOOR))`` float64 (all ones for uniform ``I``).

    Raises:
        FloatingPointError: when ``I`` is non-finite or all zero.
    """
    imp = importance.to(torch.float64)
    top = imp.max()
    if not torch.isfinite(imp).all() or top <= 0:
        raise FloatingPointError("Fisher importances are non-finite or zero: no gradient reached this layer")
    return (imp / top).clamp(min=FISHER_FLOOR).sqrt()


def fisher_truncate(weight: Tensor, scale: Tensor, k: int, axis: str) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``k`` truncation of ``D W`` (``axis="rows"``, ``d: (m,)``) or ``W D`` (``"inputs"``,
    ``d: (n,)``) with ``D`` undone on the same side (:func:`methods._linalg.diag_scaled_truncate`)."""
    return diag_scaled_truncate(weight, scale, k, axis)


@register("factorizer")
@dataclass(frozen=True)
class FisherWeightedFactorizer:
    """FWSVD's row-weighted truncation (module docstring).

    Options:
        axis: ``rows`` (the paper: one importance per output row) or ``inputs`` (per input column).
    """

    name: ClassVar[str] = "fisher-weighted"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"axis": AXES}
    axis: str = "rows"

    def __post_init__(self) -> None:
        check_choices(self)

    def statistics(self) -> tuple[SquaredGradients, ...]:
        return (SquaredGradients(),)

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization:
        importance = stats.get("fisher_rows" if self.axis == "rows" else "fisher_cols")
        if importance is None:
            raise ValueError("fisher-weighted needs the squared-gradients statistic (run it through the harness)")
        a, b, sigma = fisher_truncate(weight, fisher_scale(importance), rank, self.axis)
        return Factorization(a, b, spectrum=sigma)


register_method("fwsvd", "uniform", "fisher-weighted")
