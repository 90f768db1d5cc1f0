"""Pure linear-algebra core shared by every SVD-family method.

Conventions (README.md, "Compress and evaluate"): a target weight is ``W: (m, n)`` with ``m = out``,
``n = in`` so that ``y = W x``. Calibration inputs are accumulated as the Gram matrix
``H = sum_t x_t x_t^T`` of shape ``(n, n)``; ``||(W - W') X||_F^2 = tr((W - W') H (W - W')^T)``.
A rank-``k`` factorisation ``W' = A B`` stores ``A: (m, k)`` and ``B: (k, n)``.

Everything here takes and returns tensors, runs in float64 and imports nothing from the engine,
so each property (truncation error equals the dropped singular values, whitened error never above
plain error, ...) is unit-testable on random matrices in milliseconds.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Relative eigenvalue floor of the fallback whitening: eigenvalues below EIG_FLOOR * lambda_max are
# raised to it. Directions that carry (almost) no activation energy cost (almost) nothing when
# truncated, so clamping them only keeps the inverse finite.
EIG_FLOOR = 1e-8


def rank_from_keep(m: int, n: int, keep: float) -> int:
    """Rank of an ``(m, n)`` matrix whose factors keep ``keep`` of its ``m * n`` parameters.

    ``k = floor(keep * m * n / (m + n))`` (the floor rule of SVD-LLM, ASVD and Duo-SVD's code); a rank-k pair stores ``k (m + n)``.

    Args:
        m: Output features.
        n: Input features.
        keep: Fraction of parameters kept, in (0, 1].

    Returns:
        The rank, at least 1.
    """
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep ratio must lie in (0, 1], got {keep}")
    # The small epsilon keeps exact products (e.g. 0.5 * 512 * 512 / 1024) from flooring one short.
    return max(1, math.floor(keep * m * n / (m + n) + 1e-9))


def rank_from_ratio(m: int, n: int, ratio: float) -> int:
    """Rank at compression ``ratio`` (fraction of parameters removed): ``rank_from_keep(1 - ratio)``."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must lie in (0, 1), got {ratio}")
    return rank_from_keep(m, n, 1.0 - ratio)


def lowrank_params(m: int, n: int, k: int) -> int:
    """Stored parameters of a rank-``k`` factorisation of an ``(m, n)`` matrix: ``k (m + n)``."""
    return k * (m + n)


# Which routine gives the top singular triplets (measured with benchmarks/bench_linalg.py, figures in
# benchmarks/README.md). The symmetric eigendecomposition of the smaller Gram (M^T M or M M^T, float64)
# is about 15x faster than a full SVD on an H200 (fp64 SVD of a 4096-wide matrix 1.65 s, eigh of its
# Gram 0.11 s) and 2-2.7x faster on the CPU, with the same truncation to 1e-6 relative
# (tests/unit/test_linalg.py, tests/gpu). On CUDA, where the time goes, it is the default. On the
# CPU the full LAPACK SVD stays the default: it is the float64 reference path every other route is
# checked against, CPU records stay bit-for-bit what earlier engines gave, and measured on the tiny
# reference models, the eigh route's 1e-13 differences flip Duo-SVD's knapsack between options whose
# KL losses tie to that precision (svdbench run ... --svd-driver gram-eigh makes it the default there too).
SVD_DRIVERS = ("svd", "gram-eigh")
_DRIVER_OVERRIDE: str | None = None


def default_svd_driver(device: torch.device) -> str:
    """``gram-eigh`` on CUDA, ``svd`` on the CPU (comment above), unless :func:`set_svd_driver` chose one."""
    if _DRIVER_OVERRIDE is not None:
        return _DRIVER_OVERRIDE
    return "gram-eigh" if device.type == "cuda" else "svd"


def set_svd_driver(driver: str | None) -> None:
    """Force one routine on every device for this process (None restores the per-device default)."""
    global _DRIVER_OVERRIDE
    if driver is not None and driver not in SVD_DRIVERS:
        raise ValueError(f"svd driver must be one of {SVD_DRIVERS}, got {driver!r}")
    _DRIVER_OVERRIDE = driver


def top_svd(mat: Tensor, k: int, driver: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Top-``k`` singular triplets of ``M: (m, n)`` and all its singular values, float64.

    ``svd``: a full thin SVD. ``gram-eigh``: eigendecomposition of the smaller Gram ``G`` (``M^T M``
    when ``m >= n``, else ``M M^T``); ``sigma = sqrt(max(lambda, 0))`` and the other side's vectors
    follow as ``M v / sigma``. Both give ``M V_k V_k^T`` (or ``U_k U_k^T M``), the best rank-k
    approximation; the Gram route loses relative accuracy only in singular values below
    ``sqrt(eps) sigma_1``, which truncation drops. When ``sigma_k`` is zero to working precision
    (the Gram route cannot recover its vector) it falls back to the SVD.

    Args:
        mat: ``M: (m, n)``.
        k: Kept rank, ``1 <= k <= min(m, n)``.
        driver: ``svd``, ``gram-eigh`` or None (:func:`default_svd_driver` of the tensor's device).

    Returns:
        ``(U_k: (m, k), sigma: (min(m, n),) descending, V_k^T: (k, n))``.
    """
    m = mat.to(torch.float64)
    driver = driver or default_svd_driver(m.device)
    if driver not in SVD_DRIVERS:
        raise ValueError(f"svd driver must be one of {SVD_DRIVERS}, got {driver!r}")
    if driver == "gram-eigh":
        tall = m.shape[0] >= m.shape[1]
        gram = m.T @ m if tall else m @ m.T
        evals, evecs = torch.linalg.eigh(0.5 * (gram + gram.T))
        sigma = evals.flip(0).clamp(min=0).sqrt()
        top = evecs.flip(1)[:, :k]
        if float(sigma[k - 1]) > 1e-7 * float(sigma[0]):
            if tall:  # top: V_k (n, k)
                return (m @ top) / sigma[:k], sigma, top.T
            return top, sigma, (top.T @ m) / sigma[:k, None]
        log.debug("top_svd: sigma_k ~ 0, falling back to the full SVD")
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    return u[:, :k], s, vh[:k]


def truncated_svd(weight: Tensor, k: int, driver: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Best rank-``k`` approximation in Frobenius norm (Eckart-Young), split with sqrt(sigma).

    Args:
        weight: ``W: (m, n)``.
        k: Kept rank, ``1 <= k <= min(m, n)``.
        driver: Routine of :func:`top_svd` (None: the device's default).

    Returns:
        ``(A, B, sigma)`` with ``A = U_k S_k^{1/2}: (m, k)``, ``B = S_k^{1/2} V_k^T: (k, n)`` and all
        singular values ``sigma: (min(m, n),)`` of W, float64. ``||W - A B||_F^2 = sum_{i>k} sigma_i^2``.
    """
    u, s, vh = top_svd(weight, k, driver)
    root = s[:k].sqrt()
    return u * root, root[:, None] * vh, s


@dataclass(frozen=True)
class Whitening:
    """A factor ``T: (n, n)`` with ``T T^T = H`` (or a clamped H) and how it was obtained.

    Attributes:
        factor: ``T``; lower-triangular for ``method == "cholesky"``, ``Q diag(sqrt(lambda))`` for
            ``"eigen"``.
        method: ``"cholesky"`` or ``"eigen"`` (the fallback for a Gram that is not positive definite).
        clamped: Number of eigenvalues raised to the floor (0 for Cholesky).
        min_eig_rel: Smallest eigenvalue over the largest before clamping (None for Cholesky).
    """

    factor: Tensor
    method: str
    clamped: int = 0
    min_eig_rel: float | None = None

    def right_solve(self, mat: Tensor) -> Tensor:
        """Return ``mat T^{-1}`` for ``mat: (k, n)`` without forming the inverse."""
        if self.method == "cholesky":
            # mat T^{-1} = (T^{-T} mat^T)^T and T^T is upper triangular.
            return torch.linalg.solve_triangular(self.factor.T, mat.T, upper=True).T
        # T = Q diag(r) with orthonormal Q, so T^{-1} = diag(1/r) Q^T.
        root = self.factor.norm(dim=0)
        q = self.factor / root
        return (mat / root) @ q.T


def whitening(gram: Tensor, *, eig_floor: float = EIG_FLOOR) -> Whitening:
    """Factor ``H = T T^T`` in float64: Cholesky, with an eigenvalue fallback.

    The fallback triggers when Cholesky fails or its smallest pivot is below
    ``eig_floor`` relative to the largest diagonal entry, i.e. H is singular to working precision
    (rank-deficient calibration inputs). Then ``H = Q L Q^T`` with eigenvalues clamped at
    ``eig_floor * lambda_max`` and ``T = Q L^{1/2}``; the caller records that it happened.

    Args:
        gram: ``H: (n, n)`` symmetric positive semi-definite.
        eig_floor: Relative eigenvalue floor of the fallback.

    Returns:
        The :class:`Whitening`.

    Raises:
        FloatingPointError: if H has non-finite entries or is zero.
    """
    h = gram.to(torch.float64)
    if not torch.isfinite(h).all():
        raise FloatingPointError("Gram matrix has non-finite entries (NaN/inf in calibration activations)")
    h = 0.5 * (h + h.T)
    scale = h.diagonal().max()
    if scale <= 0:
        raise FloatingPointError("Gram matrix is zero: the layer saw no calibration signal")
    chol, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0 and chol.diagonal().min() ** 2 >= eig_floor * scale:
        return Whitening(chol, "cholesky")
    evals, evecs = torch.linalg.eigh(h)
    top = evals.max()
    floor = eig_floor * top
    clamped = int((evals < floor).sum())
    evals_c = evals.clamp(min=floor)
    log.debug("whitening fallback: %d of %d eigenvalues clamped", clamped, h.shape[0])
    return Whitening(evecs * evals_c.sqrt(), "eigen", clamped, float(evals.min() / top))


def diag_scaled_truncate(weight: Tensor, scale: Tensor, k: int, side: str = "inputs",
                         driver: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``k`` truncation of ``W D`` (``side="inputs"``, ``d: (n,)``) or ``D W`` (``"rows"``,
    ``d: (m,)``), ``D = diag(d)`` positive, with ``D`` undone on the same side: the closed form of a
    diagonally weighted Frobenius objective (ASVD's channel scaling, FWSVD's Fisher row weights).

    Returns:
        ``(A: (m, k), B: (k, n), sigma)``, ``sigma`` all singular values of the weighted matrix.

    Raises:
        FloatingPointError: when a factor is non-finite.
    """
    if side not in ("inputs", "rows"):
        raise ValueError(f"side must be 'inputs' or 'rows', got {side!r}")
    w = weight.to(torch.float64)
    d = scale.to(device=w.device, dtype=torch.float64)
    u, sigma, vh = top_svd(d[:, None] * w if side == "rows" else w * d, k, driver)
    root = sigma[:k].sqrt()
    a, b = u * root, root[:, None] * vh
    if side == "rows":
        a = a / d[:, None]
    else:
        b = b / d
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise FloatingPointError(f"diagonally scaled SVD ({side}) produced non-finite factors")
    return a, b, sigma


def whitened_truncate(weight: Tensor, white: Whitening, k: int, driver: str | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Truncation-aware whitened SVD (SVD-LLM, arXiv 2403.07378, Theorem 3.2): ``min_{rank<=k} ||(W - W') X||_F``.

    ``W T = U S V^T``; ``A = U_k S_k^{1/2}``, ``B = S_k^{1/2} V_k^T T^{-1}``. Because ``T^{-1} X`` has
    orthonormal rows, ``||(W - A B) X||_F^2 = sum_{i>k} s_i^2`` (the truncation-awareness theorem).

    Args:
        weight: ``W: (m, n)``.
        white: Whitening of the layer's input Gram.
        k: Kept rank.
        driver: Routine of :func:`top_svd` (None: the device's default).

    Returns:
        ``(A: (m, k), B: (k, n), s)`` with ``s`` all singular values of ``W T`` (float64).
    """
    return WhitenedSpectrum.of(weight, white, k, driver).truncate(k)


@dataclass(frozen=True)
class WhitenedSpectrum:
    """The top singular triplets of ``W T`` (:func:`whitened_truncate`), from which the truncation at
    any rank up to ``max_rank`` follows without another SVD: what a sensitivity probe trying many
    ranks of one matrix needs.

    Attributes:
        u: ``U: (m, max_rank)``.
        s: All singular values of ``W T``, descending (float64).
        vh: ``V^T: (max_rank, n)``.
        white: The whitening ``T``.
    """

    u: Tensor
    s: Tensor
    vh: Tensor
    white: Whitening

    @classmethod
    def of(cls, weight: Tensor, white: Whitening, max_rank: int, driver: str | None = None) -> WhitenedSpectrum:
        """SVD of ``W T`` keeping ``max_rank`` triplets (``W: (m, n)``)."""
        u, s, vh = top_svd(weight.to(torch.float64) @ white.factor, max_rank, driver)
        return cls(u, s, vh, white)

    def truncate(self, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(A = U_k S_k^{1/2}: (m, k), B = S_k^{1/2} V_k^T T^{-1}: (k, n), s)``, ``k <= max_rank``."""
        if k > self.u.shape[1]:
            raise ValueError(f"rank {k} exceeds the {self.u.shape[1]} singular triplets kept")
        root = self.s[:k].sqrt()
        return self.u[:, :k] * root, self.white.right_solve(root[:, None] * self.vh[:k]), self.s


def two_sided_truncate(weight: Tensor, left: Whitening, right: Whitening, k: int, driver: str | None = None,
                       left_transposed: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Rank-``k`` minimiser of a Kronecker-weighted error: ``min ||T_B^T (W - W') T_A||_F``.

    With ``B = T_B T_B^T: (m, m)`` (output side) and ``A = T_A T_A^T: (n, n)`` (input side),
    ``||T_B^T D T_A||_F^2 = tr(D^T B D A) = vec(D)^T (A kron B) vec(D)``: the curvature-weighted error
    of GFWSVD (Kronecker-factored Fisher) and K-FAC. Eckart-Young on ``M = T_B^T W T_A = U S V^T``:
    ``A' = T_B^{-T} U_k S_k^{1/2}``, ``B' = S_k^{1/2} V_k^T T_A^{-1}``, and the error is exactly
    ``sqrt(sum_{i>k} s_i^2)``. ``left = right = identity`` is plain truncated SVD; ``left = identity``
    is :func:`whitened_truncate` (SVD-LLM).

    ``left_transposed=False`` whitens with ``T_B`` instead of ``T_B^T`` (``M = T_B W T_A``, undone by
    ``T_B^{-1}``): the reading of LEMS's KFAC-SVD code, which minimises ``tr(D^T T_B^T T_B D A)``, not
    the Kronecker objective; it needs a Cholesky (lower-triangular) ``T_B``.

    Args:
        weight: ``W: (m, n)``.
        left: Whitening of the output-side factor ``B``.
        right: Whitening of the input-side factor ``A``.
        k: Kept rank.
        driver: Routine of :func:`top_svd` (None: the device's default).
        left_transposed: Whiten the left side with ``T_B^T`` (the objective above) or with ``T_B``.

    Returns:
        ``(A': (m, k), B': (k, n), s)`` with ``s`` all singular values of ``M`` (float64).

    Raises:
        FloatingPointError: when a factor is non-finite.
    """
    w = weight.to(torch.float64)
    lt = left.factor.T if left_transposed else left.factor
    if not left_transposed and left.method != "cholesky":
        raise ValueError("left_transposed=False needs a Cholesky (lower-triangular) left whitening")
    u, s, vh = top_svd(lt @ (w @ right.factor), k, driver)
    root = s[:k].sqrt()
    us = u * root
    # T_B^{-T} X = (X^T T_B^{-1})^T; T_B^{-1} X by a lower-triangular solve.
    a = left.right_solve(us.T).T if left_transposed else torch.linalg.solve_triangular(left.factor, us, upper=False)
    b = right.right_solve(root[:, None] * vh)
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise FloatingPointError("two-sided whitened SVD produced non-finite factors")
    return a, b, s


def output_error(weight: Tensor, approx: Tensor, gram: Tensor) -> float:
    """``||(W - W') X||_F = sqrt(tr(D H D^T))`` with ``D = W - W'``, from the Gram alone.

    Args:
        weight: ``W: (m, n)``.
        approx: ``W': (m, n)``.
        gram: ``H = X X^T: (n, n)``.
    """
    d = weight.to(torch.float64) - approx.to(torch.float64)
    val = ((d @ gram.to(torch.float64)) * d).sum()
    return float(val.clamp(min=0).sqrt())


def output_energy(weight: Tensor, gram: Tensor) -> float:
    """``||W X||_F = sqrt(tr(W H W^T))``: the denominator of the relative output error."""
    w = weight.to(torch.float64)
    return float(((w @ gram.to(torch.float64)) * w).sum().clamp(min=0).sqrt())


def paired_output_error(
    weight: Tensor, approx: Tensor, gram: Tensor, gram_hat: Tensor, cross: Tensor
) -> float:
    """``||W' Xh - W X||_F`` from Grams: the error of the compressed layer fed the compressed
    model's inputs ``Xh`` against the dense layer's output on dense inputs ``X``.

    ``||W' Xh - W X||^2 = tr(W' Hh W'^T) - 2 tr(W' C^T W^T) + tr(W H W^T)`` with ``H = X X^T``,
    ``Hh = Xh Xh^T`` and ``C = X Xh^T`` (all ``(n, n)``).
    """
    w = weight.to(torch.float64)
    a = approx.to(torch.float64)
    val = ((a @ gram_hat) * a).sum() - 2 * ((a @ cross.T) * w).sum() + ((w @ gram) * w).sum()
    return float(val.clamp(min=0).sqrt())
