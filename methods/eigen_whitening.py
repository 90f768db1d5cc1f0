"""SVD-LLM V2's loss-optimised truncation (Wang et al., arXiv 2503.12340, Sec. 3.3): whitening
through the eigendecomposition of ``H = X X^T``, never a Cholesky factor.

Our reading of the paper's pseudo-code (its Theorem: this truncation reaches the minimum loss):

    H = U_s S_s U_s^T                                 (symmetric eigendecomposition, float64)
    D = W U_s S_s^{1/2} = U_ws S_ws V_ws^T            (second SVD)
    W' = U_ws Trunc_k(S_ws) V_ws^T S_s^{-1/2} U_s^T

i.e. SVD-LLM's truncation-aware whitening with ``T = U_s S_s^{1/2}`` (``T T^T = H``) instead of the
Cholesky factor. Any such ``T`` gives the same ``W'`` when ``H`` is positive definite, so this equals
SVD-LLM there; it needs no positive-definiteness, which is the paper's point (Cholesky fails on
rank-deficient ``H``). The pseudo-code's ``S_s^{-1}`` cannot be taken literally when ``H`` is singular:
eigenvalues below ``EIG_FLOOR * lambda_max`` (1e-8, :mod:`methods._linalg`) are clamped to that
floor, so ``S_s^{-1/2}`` is finite. Clamped directions carry (almost) no activation energy, so the
loss ``||(W - W') X||_F`` barely moves; their count is reported per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods._linalg import EIG_FLOOR, Whitening, whitened_truncate
from methods.components import LinearStats, register
from methods.lowrank import Factorization


def eigen_whitening(gram: Tensor, eig_floor: float = EIG_FLOOR) -> Whitening:
    """``T = U_s max(S_s, floor)^{1/2}`` with ``H = U_s S_s U_s^T`` (float64), so ``T T^T`` is ``H``
    with its eigenvalues clamped at ``eig_floor * lambda_max``.

    Raises:
        FloatingPointError: if ``H`` has non-finite entries or is zero.
    """
    h = gram.to(torch.float64)
    if not torch.isfinite(h).all():
        raise FloatingPointError("Gram matrix has non-finite entries (NaN/inf in calibration activations)")
    h = 0.5 * (h + h.T)
    if h.diagonal().max() <= 0:
        raise FloatingPointError("Gram matrix is zero: the layer saw no calibration signal")
    evals, evecs = torch.linalg.eigh(h)
    top = evals.max()
    floor = eig_floor * top
    clamped = int((evals < floor).sum())
    return Whitening(evecs * evals.clamp(min=floor).sqrt(), "eigen", clamped, float(evals.min() / top))


def stats_eigen_whitening(stats: LinearStats) -> Whitening:
    """:func:`eigen_whitening` of ``stats.gram``, computed once per input group."""
    return stats.cached("eigen-whitening", lambda: eigen_whitening(stats.gram))


@register("factorizer")
@dataclass(frozen=True)
class EigenWhitenedFactorizer:
    """SVD-LLM V2's truncation (module docstring): whitened by the eigendecomposition of ``H``."""

    name: ClassVar[str] = "eigen-whitened"

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization:
        white = stats_eigen_whitening(stats)
        a, b, s = whitened_truncate(weight, white, rank)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise FloatingPointError("eigen-whitened truncation produced non-finite factors")
        # No "whitening" entry: the eigendecomposition is this method's route, not a fallback.
        return Factorization(a, b, spectrum=s, info={"clamped_eigenvalues": white.clamped} if white.clamped else {})
