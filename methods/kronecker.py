"""Kronecker-factored curvature of each target weight: the statistics of GFWSVD and KFAC-SVD, and
the damped Cholesky whitening of a Kronecker factor.

Both methods approximate the curvature (Fisher information) of a weight ``W: (m, n)`` by a Kronecker
product ``F ~ A kron B`` of an input-side factor ``A: (n, n)`` and an output-side factor
``B: (m, m)``, so that ``vec(D)^T F vec(D) = tr(D^T B D A) = ||T_B^T D T_A||_F^2``
(:func:`methods._linalg.two_sided_truncate`). They differ in how the two factors are estimated:

* :class:`KroneckerFisher` (GFWSVD, arXiv 2505.17974; official code github.com/sayankotor/FisherKronecker):
  the **nearest Kronecker product** (Van Loan-Pitsianis) of the observed Fisher
  ``F = (1/K) sum_d vec(G_d) vec(G_d)^T`` of per-sample weight gradients ``G_d = dL_d/dW: (m, n)``.
  Rearranged, ``F`` becomes the ``(m^2, n^2)`` operator ``R(Y) = (1/K) sum_d G_d Y G_d^T``, and
  ``min ||F - A kron B||_F`` is its top singular pair: ``B = s^{1/2} u`` (as ``(m, m)``),
  ``A = s^{1/2} v`` (as ``(n, n)``). The official code finds it with a Lanczos SVD (CuPy ``svds``,
  ``k=1``) over the stored gradients; here an alternating power iteration
  ``B <- R(A) / ||R(A)||``, ``A <- R^T(B) / ||R^T(B)||``, started from ``A = B = I``; the first step is
  the streamed pair ``(sum_d G_d G_d^T, sum_d G_d^T G_d)`` (Shampoo's preconditioners), available
  alone as ``estimator="one-step"``. Every iterate is positive semi-definite (``G Y G^T`` of a PSD
  ``Y``), so the factors are PSD with the sign fixed.
* :class:`OutputGradientGram` (KFAC-SVD, LEMS harness; code github.com/lems-svd/lems, read only):
  K-FAC's output-side factor ``G = sum_t delta_t delta_t^T: (m, m)`` over tokens of the gradient of
  the loss with respect to the linear's **output**; the input side is the input Gram ``H = sum_t
  x_t x_t^T`` every run collects. ``delta`` of the first and last ``edge_fraction`` of each window are
  dropped and the norms of the rest clipped to ``[clip_min, clip_max]`` times their mean, as LEMS's
  backward hook does.

What differs (LEMS reports GFWSVD collapsing on Llama-3-8B at high ratios where KFAC-SVD does not;
the explanation is our reading): GFWSVD's factors are the nearest Kronecker fit to ``K`` outer
products of window-level weight gradients ``G_d = sum_t delta_t x_t^T``, so with few samples they
are low rank (``rank A <= K min(m, n)``) or ill-conditioned and the whitening leans on a last-resort
shrinkage; K-FAC's factors are token-level second moments (``H`` over every token, ``G`` over every
token's output gradient), full rank from one window of 2048 tokens, and always shrunk (0.1, 0.3).

Costs, per target linear:

* ``KroneckerFisher``, ``nearest-kronecker``: the pass keeps every gradient sample ``(K, m, n)``
  float32 **on the compute device** until the end, ``K = ceil(N / group)``: ``K`` times the target
  weights (SmolLM2-135M, ``N = 8``: 3.4 GB; Llama-2-7B, ``N = 128``: 3.3 TB, out of reach: use
  ``group`` or ``one-step`` there). The iteration costs ``2 K m n (m + n)`` multiply-adds per step.
  The stored result is the two factors, ``m^2 + n^2`` float64 numbers (an ``11008^2`` factor of a 7B
  MLP is 0.97 GB, larger than the weight).
* ``KroneckerFisher``, ``one-step``: two float64 accumulators, ``m^2 + n^2`` numbers, no samples kept.
* ``OutputGradientGram``: one ``(m, m)`` float64 accumulator per target linear, on the device for the
  whole pass (Llama-2-7B: about 2.6 GB per block, 83 GB for the model, more than the float16 model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods._linalg import Whitening
from methods.statistics import Accumulator, GramProduct, flat_tokens

ESTIMATORS = ("nearest-kronecker", "one-step")
NORM_EPS = 1e-10  # LEMS's floor on a token's gradient norm: tokens below it are left untouched


def clip_token_norms(grad: Tensor, mask: Tensor | None, low: float, high: float) -> Tensor:
    """Rescale each token's gradient so its norm lies in ``[low, high]`` times its window's mean norm.

    The mean is over the window's tokens whose norm is at least ``NORM_EPS`` (and whose mask is
    True); tokens below ``NORM_EPS`` are left as they are (LEMS's ``clip_token_norms`` with
    ``boost=True``: small norms are raised, large ones lowered).

    Args:
        grad: ``(b, L, m)``.
        mask: ``(b, L)`` bool or None.
        low: Lower bound, a multiple of the mean norm.
        high: Upper bound, a multiple of the mean norm.

    Returns:
        The rescaled ``(b, L, m)`` (a new tensor).
    """
    norms = grad.norm(dim=-1, keepdim=True)  # (b, L, 1)
    live = norms >= NORM_EPS
    if mask is not None:
        live = live & mask[..., None]
    count = live.sum(dim=1, keepdim=True).clamp(min=1)
    mean = ((norms * live).sum(dim=1, keepdim=True) / count).clamp(min=NORM_EPS)  # (b, 1, 1)
    target = torch.minimum(torch.maximum(norms, low * mean), high * mean)
    target = torch.where(norms < NORM_EPS, norms, target)
    return grad * (target / norms.clamp(min=NORM_EPS))


class _OutputGramAcc:
    def __init__(self, m: int, device: torch.device, stat: OutputGradientGram) -> None:
        self.gram = torch.zeros(m, m, dtype=torch.float64, device=device)
        self.tokens = 0
        self.device, self.stat = device, stat

    def add(self, x: Tensor, mask: Tensor | None, batch: int, xh: Tensor | None = None) -> None:
        grad = x.detach().to(device=self.device, dtype=torch.float32)  # (b, L, m) dL/dy of one window
        if grad.dim() == 2:
            grad = grad[None]
        length = grad.shape[1]
        cut = int(length * self.stat.edge_fraction)
        grad = grad[:, cut: length - cut]
        if mask is not None:
            mask = mask.to(self.device)[:, cut: length - cut]
        if self.stat.clip:
            grad = clip_token_norms(grad, mask, self.stat.clip_min, self.stat.clip_max)
        rows = flat_tokens(grad, mask).double()
        self.gram += rows.T @ rows
        self.tokens += rows.shape[0]

    def result(self) -> dict[str, Tensor]:
        if self.tokens == 0:
            raise ValueError("output-gradient Gram: no calibration token was seen")
        return {"grad_out_gram": self.gram, "grad_out_tokens": torch.tensor(self.tokens, dtype=torch.int64)}


@dataclass(frozen=True)
class OutputGradientGram:
    """K-FAC's output-side factor ``G = sum_t delta_t delta_t^T: (m, m)`` per target linear (module docstring).

    ``delta_t = dL/dy_t`` for token ``t`` of a calibration window, ``L`` the window's mean next-token
    NLL; the engine feeds it per window (``feed = "output-grad"``, :mod:`harness.engine.gradients`).
    The Gram sums float64 products of the float32 gradients.

    Options:
        edge_fraction: Fraction of each window's positions dropped at either end (LEMS: ``int(0.125 L)``).
        clip: Whether token gradient norms are clipped to ``[clip_min, clip_max]`` times their mean (LEMS: yes).
        clip_min: Lower clip, a multiple of the window's mean token norm (LEMS: 0.1).
        clip_max: Upper clip (LEMS: 10).
    """

    scope: ClassVar[str] = "gradient"
    stream: ClassVar[str] = "dense"
    feed: ClassVar[str] = "output-grad"
    names: ClassVar[tuple[str, ...]] = ("grad_out_gram", "grad_out_tokens")
    requires_causal_lm: ClassVar[str] = "its output-side factor is made of gradients of the next-token loss"
    edge_fraction: float = 0.125
    clip: bool = True
    clip_min: float = 0.1
    clip_max: float = 10.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.edge_fraction < 0.5:
            raise ValueError(f"edge_fraction must lie in [0, 0.5), got {self.edge_fraction}")
        if self.clip and not 0.0 <= self.clip_min <= 1.0 <= self.clip_max:
            raise ValueError(f"need 0 <= clip_min <= 1 <= clip_max, got {self.clip_min}, {self.clip_max}")

    @property
    def key(self) -> str:
        clip = f"clip={self.clip_min:g}-{self.clip_max:g}" if self.clip else "noclip"
        return f"output-grad-gram[edge={self.edge_fraction:g},{clip}]"

    def accumulator(self, n: int, device: torch.device, product: GramProduct) -> Accumulator:
        """``n`` is the linear's ``out_features`` here (the engine sizes output-gradient feeds so)."""
        return _OutputGramAcc(n, device, self)


def nearest_kronecker(samples: Tensor, tol: float, max_iter: int) -> tuple[Tensor, Tensor, int]:
    """Nearest Kronecker product ``A kron B`` of ``F = (1/K) sum_d vec(G_d) vec(G_d)^T`` (module docstring).

    Alternating power iteration for the top singular pair of ``R(Y) = (1/K) sum_d G_d Y G_d^T``,
    from ``A = I``; it stops when the unit-norm input factor moves less than ``tol`` (Frobenius).

    Args:
        samples: ``(K, m, n)`` gradient samples (float32 is enough: the products accumulate in float64).
        tol: Convergence threshold on the change of the normalised input factor.
        max_iter: At most this many alternating steps.

    Returns:
        ``(B: (m, m), A: (n, n), steps)`` float64, symmetric PSD, scaled as ``s^{1/2}`` times the unit
        singular vectors (the official code's scaling; the truncation does not depend on it).

    Raises:
        FloatingPointError: on a non-finite or zero result (no gradient reached the layer).
    """
    k, m, n = samples.shape
    dev, dt = samples.device, samples.dtype

    def out_side(a: Tensor) -> Tensor:  # (1/K) sum_d G_d A G_d^T
        a32 = a.to(dt)
        acc = torch.zeros(m, m, dtype=torch.float64, device=dev)
        for g in samples:
            acc += ((g @ a32) @ g.T).double()
        return acc / k

    def in_side(b: Tensor) -> Tensor:  # (1/K) sum_d G_d^T B G_d
        b32 = b.to(dt)
        acc = torch.zeros(n, n, dtype=torch.float64, device=dev)
        for g in samples:
            acc += ((g.T @ b32) @ g).double()
        return acc / k

    def unit(x: Tensor) -> tuple[Tensor, float]:
        x = 0.5 * (x + x.T)
        norm = float(x.norm())
        if not math.isfinite(norm) or norm <= 0.0:
            raise FloatingPointError("Kronecker Fisher factor is non-finite or zero: no gradient reached this layer")
        return x / norm, norm

    a, _ = unit(torch.eye(n, dtype=torch.float64, device=dev))
    b = a_next = None
    sigma, steps = 0.0, 0
    for steps in range(1, max_iter + 1):  # noqa: B007  (steps is returned)
        b, _ = unit(out_side(a))
        a_next, sigma = unit(in_side(b))
        moved = float((a_next - a).norm())
        a = a_next
        if moved < tol:
            break
    assert b is not None
    root = math.sqrt(sigma)
    return b * root, a * root, steps


class _KroneckerFisherAcc:
    def __init__(self, device: torch.device, stat: KroneckerFisher) -> None:
        self.device, self.stat = device, stat
        self.samples: list[Tensor] = []
        self.group_sum: Tensor | None = None
        self.in_group = 0
        self.out_acc: Tensor | None = None
        self.in_acc: Tensor | None = None
        self.count = 0

    def add(self, x: Tensor, mask: Tensor | None, batch: int, xh: Tensor | None = None) -> None:
        grad = x.detach().to(device=self.device, dtype=torch.float32)  # (m, n) of one window; freed by the engine
        self.group_sum = grad.clone() if self.group_sum is None else self.group_sum.add_(grad)
        self.in_group += 1
        if self.in_group == self.stat.group:
            self._close_group()

    def _close_group(self) -> None:
        if self.group_sum is None:
            return
        sample = self.group_sum / self.in_group  # the mean gradient of the group is one sample
        self.group_sum, self.in_group = None, 0
        self.count += 1
        if self.stat.estimator == "one-step":
            s64 = sample.double()
            out, inn = s64 @ s64.T, s64.T @ s64
            self.out_acc = out if self.out_acc is None else self.out_acc.add_(out)
            self.in_acc = inn if self.in_acc is None else self.in_acc.add_(inn)
        else:
            self.samples.append(sample)

    def result(self) -> dict[str, Tensor]:
        self._close_group()
        if self.count == 0:
            raise ValueError("Kronecker Fisher: no calibration window was seen")
        if self.stat.estimator == "one-step":
            assert self.out_acc is not None and self.in_acc is not None
            out, inn, steps = self.out_acc / self.count, self.in_acc / self.count, 0
        else:
            stacked = torch.stack(self.samples)
            self.samples = []  # the factors replace the samples
            out, inn, steps = nearest_kronecker(stacked, self.stat.tol, self.stat.max_iter)
        return {"kron_fisher_out": out, "kron_fisher_in": inn,
                "kron_fisher_samples": torch.tensor(self.count, dtype=torch.int64),
                "kron_fisher_steps": torch.tensor(steps, dtype=torch.int64)}


@dataclass(frozen=True)
class KroneckerFisher:
    """GFWSVD's Kronecker factors ``B: (m, m)`` (output side) and ``A: (n, n)`` (input side) of each
    target weight's observed Fisher (module docstring).

    Options:
        estimator: ``nearest-kronecker`` (the official code: top singular pair of the rearranged
            Fisher) or ``one-step`` (its first power step, ``sum G G^T`` and ``sum G^T G``, streamed
            with no samples kept).
        group: Calibration windows averaged into one gradient sample ``G_d`` (1: per-window samples,
            the observed Fisher's definition; the official scripts average 32 sequences per stored
            gradient to bound their disk, 128 samples of 4096 sequences).
        tol: Convergence of the power iteration (change of the unit-norm input factor).
        max_iter: Its step limit.
    """

    scope: ClassVar[str] = "gradient"
    stream: ClassVar[str] = "dense"
    names: ClassVar[tuple[str, ...]] = ("kron_fisher_out", "kron_fisher_in", "kron_fisher_samples",
                                        "kron_fisher_steps")
    requires_causal_lm: ClassVar[str] = "its Kronecker Fisher factors are gradients of the next-token loss"
    estimator: str = "nearest-kronecker"
    group: int = 1
    tol: float = 1e-6
    max_iter: int = 100

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.group < 1 or self.max_iter < 1 or not self.tol > 0:
            raise ValueError(f"need group >= 1, max_iter >= 1, tol > 0; got {self.group}, {self.max_iter}, {self.tol}")

    @property
    def key(self) -> str:
        if self.estimator == "one-step":
            return f"kronecker-fisher[one-step,group={self.group}]"
        return f"kronecker-fisher[group={self.group},tol={self.tol:g},max_iter={self.max_iter}]"

    def accumulator(self, n: int, device: torch.device, product: GramProduct) -> Accumulator:
        return _KroneckerFisherAcc(device, self)


def shrink(mat: Tensor, alpha: float) -> Tensor:
    """``(1 - alpha) M + alpha mean(diag M) I``: shrinkage toward the scaled identity (Ledoit-Wolf
    style), the damping both official codes use; scale-free, so the factors' normalisation is moot."""
    if alpha == 0.0:
        return mat
    eye = torch.eye(mat.shape[0], dtype=mat.dtype, device=mat.device)
    return (1.0 - alpha) * mat + alpha * mat.diagonal().mean() * eye


def damped_cholesky(factor: Tensor, alphas: tuple[float, ...], what: str) -> tuple[Whitening, float]:
    """Cholesky whitening ``T T^T = shrink(F, alpha)`` with the first ``alpha`` of ``alphas`` that makes
    the factor positive definite (float64).

    Args:
        factor: ``F: (p, p)`` symmetric PSD Kronecker factor.
        alphas: Shrinkages to try, in order.
        what: The factor's name, for errors.

    Returns:
        ``(whitening, alpha used)``.

    Raises:
        FloatingPointError: when ``F`` is non-finite or has a non-positive mean diagonal, or when no
            ``alpha`` makes it positive definite.
    """
    f = factor.to(torch.float64)
    if not torch.isfinite(f).all():
        raise FloatingPointError(f"{what} Kronecker factor has non-finite entries")
    f = 0.5 * (f + f.T)
    if not float(f.diagonal().mean()) > 0.0:
        raise FloatingPointError(f"{what} Kronecker factor is zero: no calibration signal reached this layer")
    for alpha in alphas:
        chol, info = torch.linalg.cholesky_ex(shrink(f, alpha))
        if int(info) == 0 and torch.isfinite(chol).all():
            return Whitening(chol, "cholesky"), alpha
    raise FloatingPointError(f"{what} Kronecker factor is not positive definite after shrinkage "
                             f"{', '.join(f'{a:g}' for a in alphas)}; raise the shrinkage option")
