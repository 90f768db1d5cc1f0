"""adaComp: alternating least-squares refinement of the two SVD factors (AdaSVD, METHODS.md 4.1).

The factorizer's output ``W' = A B`` (``A = U: (m, k)``, ``B = V^T: (k, n)``) is refined by block
coordinate descent on

    L(A, B) = ||A B Xh - W X||_F^2
            = tr(A B Hh B^T A^T) - 2 tr(A B C^T W^T) + tr(W H W^T)

with ``H = X X^T``, ``Hh = Xh Xh^T`` and ``C = X Xh^T`` (all ``(n, n)``, fp64). ``X`` are the dense
model's inputs of the layer and ``Xh`` either the same (``inputs=original``: ``Hh = C = H``) or the
inputs of the model whose earlier blocks are already compressed (``inputs=compressed``): the refit
then also absorbs the error that earlier blocks pushed into this layer's input. Both steps are exact
minimisers of L in one factor (normal equations, no ``N x n`` activation matrix):

* U-step, B fixed:  ``A = W C B^T (B Hh B^T)^{-1}``                       (k x k system)
* V^T-step, A fixed: ``B = A^+ W C Hh^{-1}``                             (n x n system, Cholesky of Hh
  with the eigenvalue fallback of :func:`methods._linalg.whitening` when Hh is singular)

The trap (asserted in the unit tests): with ``inputs=original`` and a whitened start the factors are
already the global optimum of L (SVD-LLM's truncation theorem), so adaComp cannot change anything.
It only helps when the start is not the optimum for the data it refits on: compressed-prefix inputs,
a plain-SVD start, or stacked (averaged) samples. In ``compressed`` mode the alternation converges
towards the reduced-rank-regression optimum ``rank_k(W C Th^{-T}) Th^{-1}`` (``Hh = Th Th^T``);
:func:`reduced_rank_optimum` computes it for the tests.

The refinement is monotone: the returned factors are the best of the input factors, the start and
every iterate under L (``Factorization.info["adacomp_history"]`` holds the relative error
``sqrt(L / tr(W H W^T))`` per iteration, index 0 = the start).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods._linalg import Whitening, truncated_svd, whitened_truncate, whitening
from methods.components import LinearStats, register
from methods.lowrank import Factorization

log = logging.getLogger(__name__)

INITS = ("factorizer", "plain", "whitened")
INPUTS = ("original", "compressed")


@dataclass(frozen=True)
class PairedGrams:
    """The three Grams of the objective (module docstring), fp64.

    Attributes:
        gram: ``H = X X^T: (n, n)`` (dense inputs; only its trace term enters L).
        gram_hat: ``Hh = Xh Xh^T: (n, n)``.
        cross: ``C = X Xh^T: (n, n)``.
    """

    gram: Tensor
    gram_hat: Tensor
    cross: Tensor

    @classmethod
    def original(cls, gram: Tensor) -> PairedGrams:
        """``Xh = X``: ``Hh = C = H``."""
        g = gram.to(torch.float64)
        return cls(g, g, g)


def objective(weight: Tensor, a: Tensor, b: Tensor, grams: PairedGrams, wc: Tensor | None = None) -> float:
    """``L(A, B) = ||A B Xh - W X||_F^2`` from Grams (module docstring).

    Args:
        weight: ``W: (m, n)``.
        a: ``A: (m, k)``.
        b: ``B: (k, n)``.
        grams: ``H, Hh, C``.
        wc: ``W C: (m, n)`` if already computed.

    Returns:
        The squared error (a float, clamped at 0 against round-off).
    """
    w = weight.to(torch.float64)
    wc = w @ grams.cross if wc is None else wc
    gk = b @ grams.gram_hat @ b.T  # (k, k)
    val = ((a @ gk) * a).sum() - 2 * ((wc @ b.T) * a).sum() + ((w @ grams.gram) * w).sum()
    return max(float(val), 0.0)


def _spd_solve_right(rhs: Tensor, gram: Tensor, ridge: float) -> Tensor:
    """``rhs G^{-1}`` for a small symmetric PSD ``G: (k, k)``; ridge relative to ``tr(G) / k`` if singular."""
    g = 0.5 * (gram + gram.T)
    scale = float(g.diagonal().mean().clamp(min=torch.finfo(torch.float64).tiny))
    eye = torch.eye(g.shape[0], dtype=g.dtype)
    delta = ridge * scale
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(g + delta * eye)
        if int(info) == 0:
            return torch.cholesky_solve(rhs.T, chol).T
        # Singular k x k system: a factor direction carries no energy; grow the ridge until it factors.
        delta = max(delta * 100, 1e-12 * scale)
    return rhs @ torch.linalg.pinv(g)


def _gram_right_solve(mat: Tensor, white: Whitening) -> Tensor:
    """``mat Hh^{-1} = mat T^{-T} T^{-1}`` for ``Hh = T T^T`` (clamped inverse when Hh is singular)."""
    if white.method == "cholesky":
        # mat T^{-T} = (T^{-1} mat^T)^T with T lower triangular.
        half = torch.linalg.solve_triangular(white.factor, mat.T, upper=False).T
    else:
        root = white.factor.norm(dim=0)
        half = (mat @ (white.factor / root)) / root  # T = Q diag(r): T^{-T} = Q diag(1/r)
    return white.right_solve(half)


def u_step(wc: Tensor, b: Tensor, gram_hat: Tensor, ridge: float = 1e-10) -> Tensor:
    """Exact minimiser in ``A`` with ``B`` fixed: ``A = W C B^T (B Hh B^T)^{-1}``.

    Args:
        wc: ``W C: (m, n)``.
        b: ``B = V^T: (k, n)``.
        gram_hat: ``Hh: (n, n)``.
        ridge: Ridge of the ``(k, k)`` system relative to its mean diagonal, used only if it is singular.

    Returns:
        ``A: (m, k)``.
    """
    return _spd_solve_right(wc @ b.T, b @ gram_hat @ b.T, ridge)


def v_step(wc: Tensor, a: Tensor, white_hat: Whitening, ridge: float = 1e-10) -> Tensor:
    """Exact minimiser in ``B`` with ``A`` fixed: ``B = A^+ W C Hh^{-1}``.

    ``A^+ = (A^T A)^{-1} A^T`` through a Cholesky of the ``(k, k)`` Gram ``A^T A``.

    Args:
        wc: ``W C: (m, n)``.
        a: ``A = U: (m, k)``.
        white_hat: Whitening of ``Hh`` (gives ``Hh^{-1}`` by two triangular solves).
        ridge: Ridge of ``A^T A`` relative to its mean diagonal, used only if it is singular.

    Returns:
        ``B: (k, n)``.
    """
    pinv_wc = _spd_solve_right((wc.T @ a), a.T @ a, ridge).T  # (A^T A)^{-1} A^T W C: (k, n)
    return _gram_right_solve(pinv_wc, white_hat)


def balance(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Re-split ``A B`` as ``U_k S^{1/2}, S^{1/2} V_k^T`` (same product, balanced factor norms).

    Alternating steps leave the scale split between the factors arbitrary; the sqrt(sigma) split of
    the other factorizers keeps half-precision factors well scaled. Cost ``O((m + n) k^2)``.

    Returns:
        ``(A', B', s)`` with ``A' B' = A B`` and ``s: (k,)`` the singular values of ``A B``.
    """
    qa, ra = torch.linalg.qr(a)
    qb, rb = torch.linalg.qr(b.T)
    u, s, vh = torch.linalg.svd(ra @ rb.T)
    root = s.sqrt()
    return qa @ (u * root), root[:, None] * (vh @ qb.T), s


def alternate(
    weight: Tensor,
    a: Tensor,
    b: Tensor,
    grams: PairedGrams,
    iters: int,
    *,
    white_hat: Whitening | None = None,
    ridge: float = 1e-10,
) -> tuple[Tensor, Tensor, list[float]]:
    """Run ``iters`` alternating (U-step, V^T-step) iterations; return the best iterate.

    Args:
        weight: ``W: (m, n)``.
        a: Start ``A: (m, k)``.
        b: Start ``B: (k, n)``.
        grams: ``H, Hh, C``.
        iters: Number of full iterations (tau); 0 returns the start.
        white_hat: Whitening of ``Hh`` if already computed (shared with the factorizer's cache).
        ridge: Relative ridge of the ``(k, k)`` systems when singular.

    Returns:
        ``(A, B, history)``: the factors with the lowest objective among the start and the iterates,
        and ``history[t]`` = L after iteration t (``history[0]`` = start), full precision.
    """
    w = weight.to(torch.float64)
    a, b = a.to(torch.float64), b.to(torch.float64)
    wc = w @ grams.cross
    if iters > 0 and white_hat is None:
        white_hat = whitening(grams.gram_hat)
    best = (objective(w, a, b, grams, wc), a, b)
    history = [best[0]]
    for _ in range(iters):
        a = u_step(wc, b, grams.gram_hat, ridge)
        b = v_step(wc, a, white_hat, ridge)  # type: ignore[arg-type]
        loss = objective(w, a, b, grams, wc)
        history.append(loss)
        if loss < best[0]:
            best = (loss, a, b)
    return best[1], best[2], history


def reduced_rank_optimum(weight: Tensor, grams: PairedGrams, k: int) -> tuple[Tensor, Tensor]:
    """Global minimiser of L over rank-k ``W'`` (reduced-rank regression), for tests and reports.

    With ``Hh = Th Th^T``: ``L = ||W' Th - W C Th^{-T}||_F^2 + const``, so ``W' Th`` is the rank-k
    truncation of ``W C Th^{-T}``. For ``Hh = C = H`` this is SVD-LLM's whitened truncation.

    Returns:
        ``(A: (m, k), B: (k, n))``.
    """
    white = whitening(grams.gram_hat)
    target = _gram_right_solve(weight.to(torch.float64) @ grams.cross, white) @ white.factor  # W C Th^{-T}
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:k].sqrt()
    return u[:, :k] * root, white.right_solve(root[:, None] * vh[:k])


@register("refiner")
@dataclass(frozen=True)
class AdaCompRefiner:
    """adaComp (module docstring).

    Attributes:
        iters: Alternating iterations tau (METHODS.md suggests 5-15).
        init: Starting factors: ``factorizer`` (what the factorizer returned; default, so
            ``adasvd`` starts from the whitened truncation), or the refiner recomputes them at the same
            rank as ``plain`` truncated SVD or ``whitened`` truncation of W. The received factors
            stay a candidate for the returned best, so the refiner never returns worse factors than
            it was given.
        inputs: ``compressed`` (activations of the model with earlier blocks compressed; target is
            the dense output W X) or ``original`` (dense activations).
        stack_of_batch: ``mini_bsz`` of the stack-of-batch approximation (0 = off): fit on the Grams
            of averaged groups of ``mini_bsz`` shuffled samples (``LinearStats.gram_stacked`` and,
            with compressed inputs, ``gram_hat_stacked`` / ``cross_stacked``) collected by the
            statistics engine. The monotone choice of the best iterate is then made on that
            (stacked) objective, the one being optimised.
        ridge: Relative ridge of the ``(k, k)`` systems, applied only when one is singular.
    """

    name: ClassVar[str] = "adacomp"
    iters: int = 10
    init: str = "factorizer"
    inputs: str = "compressed"
    stack_of_batch: int = 0
    ridge: float = 1e-10

    def __post_init__(self) -> None:
        if self.init not in INITS:
            raise ValueError(f"adacomp.init must be one of {INITS}, got {self.init!r}")
        if self.inputs not in INPUTS:
            raise ValueError(f"adacomp.inputs must be one of {INPUTS}, got {self.inputs!r}")
        if int(self.iters) != self.iters or self.iters < 0:
            raise ValueError(f"adacomp.iters must be a non-negative integer, got {self.iters!r}")
        if int(self.stack_of_batch) != self.stack_of_batch or self.stack_of_batch < 0 or self.stack_of_batch == 1:
            raise ValueError(f"adacomp.stack_of_batch must be 0 (off) or an integer >= 2, got {self.stack_of_batch!r}")
        if not 0.0 <= self.ridge < 1.0:
            raise ValueError(f"adacomp.ridge must lie in [0, 1), got {self.ridge!r}")

    @property
    def needs_compressed_inputs(self) -> bool:
        # The stacked Grams are collected by the engine's streaming pass, which only runs for
        # components that ask for compressed inputs; with inputs=original the extra Grams are unused.
        return self.inputs == "compressed" or self.stack_of_batch > 0

    def grams(self, stats: LinearStats) -> PairedGrams:
        """The Grams this configuration fits on (raises if the engine did not collect them)."""
        if self.stack_of_batch:
            if stats.gram_stacked is None or (self.inputs == "compressed" and stats.cross_stacked is None):
                raise ValueError("adacomp.stack_of_batch needs stacked Grams from the statistics engine")
            if self.inputs == "original":
                return PairedGrams.original(stats.gram_stacked)
            return PairedGrams(stats.gram_stacked, stats.gram_hat_stacked, stats.cross_stacked)  # type: ignore[arg-type]
        if self.inputs == "original":
            return PairedGrams.original(stats.gram)
        if stats.gram_hat is None or stats.cross is None:
            raise ValueError("adacomp.inputs=compressed needs gram_hat and cross (paired statistics pass)")
        return PairedGrams(stats.gram.to(torch.float64), stats.gram_hat.to(torch.float64), stats.cross.to(torch.float64))

    def refine(self, weight: Tensor, fact: Factorization, stats: LinearStats) -> Factorization:
        """Refine ``fact`` of ``W: (m, n)`` at the same rank (storage unchanged)."""
        w = weight.to(torch.float64)
        k = fact.rank
        grams = self.grams(stats)
        if self.init == "plain":
            a0, b0, _ = truncated_svd(w, k)
        elif self.init == "whitened":
            a0, b0, _ = whitened_truncate(w, stats.whitening(), k)
        else:
            a0, b0 = fact.a.to(torch.float64), fact.b.to(torch.float64)
        # In original mode Hh is the dense Gram: reuse the whitening cached on the stats.
        white_hat = stats.whitening() if self.inputs == "original" and not self.stack_of_batch else None
        a, b, history = alternate(w, a0, b0, grams, int(self.iters), white_hat=white_hat, ridge=self.ridge)
        best = min(history)
        returned = "iterate"
        if self.init != "factorizer":
            given = objective(w, fact.a.to(torch.float64), fact.b.to(torch.float64), grams)
            if given < best:
                a, b, best, returned = fact.a.to(torch.float64), fact.b.to(torch.float64), given, "input"
        a, b, _ = balance(a, b)
        energy = max(objective(w, a[:, :0], b[:0], grams), torch.finfo(torch.float64).tiny)  # tr(W H W^T)
        info = dict(fact.info)
        info.update(
            adacomp_history=[float(f"{(h / energy) ** 0.5:.6g}") for h in history],
            adacomp_best_iter=history.index(min(history)),
            adacomp_returned=returned,
        )
        log.debug("adacomp rel. error %.4g -> %.4g", (history[0] / energy) ** 0.5, (best / energy) ** 0.5)
        return Factorization(a, b, spectrum=fact.spectrum, info=info)
