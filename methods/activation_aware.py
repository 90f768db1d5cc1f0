"""ASVD's activation-aware factorizer (Yuan et al., arXiv 2312.05821, Sec. 3.2, Eq. 4-5).

Input channels with large activations (outliers) matter more to the layer's output than their
weight columns' share of ``||W||_F`` says. ASVD scales the columns before truncating:

    S = diag(s),  s_j = a_j^alpha,   a_j = mean_t |x_{t, j}|        (statistic ``input-abs-mean``)
    W S = U Sigma V^T,   A = U_k Sigma_k^{1/2},   B = Sigma_k^{1/2} V_k^T S^{-1}

so ``W' = A B`` is the rank-k truncation of ``W S`` with the scaling undone on ``V`` (the input side).
``alpha = 0`` gives ``S = I``: plain SVD, bit for bit. ``alpha = 0.5`` is the paper's default.

Numerics: a channel that never fires (``a_j = 0``) would make ``S`` singular; ``a`` is floored at
``SCALE_FLOOR * max(a)`` first (ASVD adds 1e-6 to ``s`` instead). A non-finite scaling or factor is an
error: ASVD's code silently replaces such a layer by a freshly initialised linear, which hides the
failure in the perplexity.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods._linalg import diag_scaled_truncate
from methods.activation_stats import InputAbsMean
from methods.components import LinearStats, register
from methods.lowrank import Factorization

SCALE_FLOOR = 1e-6  # relative floor of the channel means before the power (keeps S invertible)


def channel_scaling(abs_mean: Tensor, alpha: float) -> Tensor:
    """``s = max(a, SCALE_FLOOR max(a))^alpha: (n,)`` float64 (all ones for ``alpha = 0``).

    Raises:
        FloatingPointError: when ``a`` is non-finite or all zero.
    """
    a = abs_mean.to(torch.float64)
    top = a.max() if a.numel() else torch.tensor(0.0, dtype=torch.float64)
    if not torch.isfinite(a).all() or top <= 0:
        raise FloatingPointError("activation means are non-finite or zero: the layer saw no calibration signal")
    return a.clamp(min=SCALE_FLOOR * float(top)).pow(alpha)


def scaled_truncate(weight: Tensor, scale: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``k`` truncation of ``W diag(s)`` (``s: (n,)``) with the scaling undone on the input side:
    ``A B = trunc_k(W diag(s)) diag(s)^{-1}`` (:func:`methods._linalg.diag_scaled_truncate`)."""
    return diag_scaled_truncate(weight, scale, k, "inputs")


@register("factorizer")
@dataclass(frozen=True)
class ActivationAwareFactorizer:
    """ASVD's scaled truncation (module docstring).

    Options:
        alpha: Exponent of the channel means (paper: 0.5; 0 = plain SVD).
    """

    name: ClassVar[str] = "asvd-scaling"
    alpha: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 4.0:
            raise ValueError(f"asvd-scaling.alpha must lie in [0, 4], got {self.alpha}")

    def statistics(self) -> tuple[InputAbsMean, ...]:
        return (InputAbsMean(),)

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization:
        abs_mean = stats.get("input_abs_mean")
        if abs_mean is None:
            raise ValueError("asvd-scaling needs the input-abs-mean statistic (run it through the harness)")
        a, b, sigma = scaled_truncate(weight, channel_scaling(abs_mean, self.alpha), rank)
        return Factorization(a, b, spectrum=sigma)
