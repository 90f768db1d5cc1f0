"""Swift-SVD's closed-form truncation from the output covariance (Qi et al., ICML 2026, arXiv 2604.01609).

The official code (github hiahei/Swift-SVD: ``utils/svd.py``'s ``IncrementalSVD``, ``train_svd.py``,
``update_svd_weights_end.py``) accumulates the output Gram of each target linear and takes one
symmetric eigendecomposition:

    C_y = sum_t y_t y_t^T = W H W^T   (m, m),      C_y = Q diag(lambda) Q^T   (lambda descending)
    W' = Q_k Q_k^T W:   A = Q_k (m, k),   B = Q_k^T W (k, n)

This is the exact minimiser of ``||(W - W') X||_F`` over rank ``k``: ``W X`` has left singular vectors
``Q`` and singular values ``sqrt(lambda)``, so ``Q_k Q_k^T W X`` is its Eckart-Young truncation and

    ||(W - W') X||_F^2 = sum_{i > k} lambda_i.

It is the same ``W'`` as SVD-LLM's whitened truncation whenever ``H`` is positive definite (``W T =
U S V^T`` gives ``W' = U_k U_k^T W`` and ``U = Q``), and stays exact when ``H`` is singular, with no
Cholesky, no inverse and no eigenvalue floor. We form ``C_y`` from the stored input Gram, ``W H W^T``
(float64), rather than from the outputs the official hooks see: identical for bias-free linears (a
bias would add ``b b^T`` terms the code includes and the objective ``||(W - W') X||`` does not), and it
reuses the Gram every method already collects. The reported spectrum is ``sqrt(max(lambda, 0))``,
the singular values of ``W X`` (equal to SVD-LLM's whitened spectrum).

Cost per linear: ``W H W^T`` (``m n^2 + m^2 n``) and one ``m x m`` eigendecomposition (the code's
choice also for ``m > n``, e.g. ``up_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods.components import LinearStats, register
from methods.lowrank import Factorization


def output_covariance(weight: Tensor, gram: Tensor) -> Tensor:
    """``C_y = W H W^T: (m, m)`` float64, symmetrised.

    Raises:
        FloatingPointError: when ``H`` or ``W`` has non-finite entries or ``H`` is zero.
    """
    w, h = weight.to(torch.float64), gram.to(device=weight.device, dtype=torch.float64)
    if not (torch.isfinite(h).all() and torch.isfinite(w).all()):
        raise FloatingPointError("output covariance: non-finite Gram or weight")
    if h.diagonal().max() <= 0:
        raise FloatingPointError("Gram matrix is zero: the layer saw no calibration signal")
    c = w @ h @ w.T
    return 0.5 * (c + c.T)


def output_covariance_truncate(weight: Tensor, gram: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``k`` ``W' = Q_k Q_k^T W`` from ``C_y = W H W^T`` (module docstring).

    Args:
        weight: ``W: (m, n)``.
        gram: ``H: (n, n)`` input Gram.
        k: Kept rank, ``1 <= k <= m``.

    Returns:
        ``(A = Q_k: (m, k), B = Q_k^T W: (k, n), sqrt(lambda): (m,) descending)``, float64.

    Raises:
        FloatingPointError: on non-finite inputs or factors, or a zero Gram.
    """
    w = weight.to(torch.float64)
    evals, evecs = torch.linalg.eigh(output_covariance(w, gram))
    evals, evecs = evals.flip(0), evecs.flip(1)
    q = evecs[:, :k].contiguous()
    b = q.T @ w
    if not (torch.isfinite(q).all() and torch.isfinite(b).all()):
        raise FloatingPointError("output-covariance truncation produced non-finite factors")
    return q, b, evals.clamp(min=0).sqrt()


@register("factorizer")
@dataclass(frozen=True)
class OutputCovarianceFactorizer:
    """Swift-SVD's truncation: one eigendecomposition of ``W H W^T`` (module docstring)."""

    name: ClassVar[str] = "output-covariance"

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization:
        a, b, s = output_covariance_truncate(weight, stats.gram, rank)
        return Factorization(a, b, spectrum=s)
