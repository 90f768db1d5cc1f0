"""adaComp: alternating least-squares refinement of the two SVD factors (AdaSVD, arXiv 2502.01403).

Paper (Sec. 3.1): the truncated factors ``W' = A B`` (``A = U_k^sigma: (m, k)``,
``B = V_k^sigma^T: (k, n)``) are refined by alternating exact minimisations of Eq. (4)/(5),

    L(A, B) = ||A B X - W X||_F^2                 (one X on both sides of the norm)

with the U-step of Eq. (8)-(10) (least squares of ``W X`` on ``B X``, pseudo-inverse) and the
V^T-step of Eq. (13), ``B = A^+ W``, repeated tau times in the order of Eq. (16) (U first). Only
Gram matrices are needed here (no ``N x n`` activation matrix).

What the paper leaves open, and the option that records our reading (defaults in brackets):

* ``inputs`` [compressed]: which X. Algorithm 1 runs ``ADA_UPDATE`` on the model with the
  calibration batch, after every layer was truncated; AdaSVD extends SVD-LLM's code, whose update
  pass (``whitening_local_update``) feeds each layer the outputs of the already-updated prefix. So X
  is ``Xh``, the input the layer gets once the earlier blocks are compressed. ``dense`` uses the
  dense model's inputs: then the whitened start is already the optimum of L and adaComp cannot move
  (SVD-LLM's truncation theorem; asserted in the unit tests).
* ``target`` [same]: the output the factors must reproduce. ``same`` is Eq. (4) as written, the
  dense weight's output on the same inputs, ``W Xh`` (SVD-LLM's update pass hooks the dense layer on
  the compressed stream). ``dense`` regresses the dense model's output ``W X`` on ``Xh`` with the
  cross Gram ``C = X Xh^T``: it also absorbs the error the earlier blocks pushed into this layer's
  input, but least squares on noisy regressors shrinks the output (``shrinkage=norm`` undoes the
  scale). With ``inputs=dense`` both targets are the same objective.
* ``iters`` [1]: Table 3(c) gives Table 1's results with one iteration at 40-60 % (3 and 15
  iterations are worse there; more help only at 70-80 %).
* ``init`` [factorizer]: the start. Algorithm 1 (lines 9-10) truncates ``SVD(W S)`` with SVD-LLM's
  whitening ``S``, i.e. the ``whitened`` factorizer of ``adasvd``; Figure 2 labels the start only as
  "truncation". ``plain`` and ``whitened`` recompute the start here.
* ``stack_of_batch`` [0]: Eq. (14)/(15) average groups of ``mini_bsz = ceil(N / M)`` shuffled samples,
  where ``M`` is the number of samples that fit the GPU (32 on their A100 for N = 256, so
  ``mini_bsz = 8``). With ``N <= 32`` calibration samples that is 1, i.e. off; Grams cost no memory
  per sample here, so stacking only changes the data the factors are fitted on. ``0`` (current
  default) is off whatever ``N``; ``paper`` applies the paper's rule with ``M = 32``
  (:func:`methods.stack_of_batch.paper_mini_bsz`, resolved by the engine once ``N`` is known: off
  for ``N <= 32``, 8 at the CLI default of 256 samples); an integer ``>= 2`` fixes ``mini_bsz``.
* The V^T-step: with ``target=same`` the paper's ``B = A^+ W`` is an exact minimiser of L for any
  input Gram (``A^T (A B - W) Hh = 0``), so it is used as written. With ``target=dense`` the exact
  minimiser is ``B = A^+ W C Hh^{-1}`` (Cholesky of Hh, eigenvalue fallback when Hh is singular).

In Gram form, with ``G`` the target's Gram (``Hh`` or the dense ``H``), ``Hh = Xh Xh^T`` and the
cross Gram ``C`` (``= Hh`` for ``target=same``):

    L(A, B) = tr(A B Hh B^T A^T) - 2 tr(A B C^T W^T) + tr(W G W^T)
    U-step:  A = W C B^T (B Hh B^T)^{-1}                               (k x k system)

The refinement is monotone: the returned factors are the best of the input factors, the start and
every iterate under L (``Factorization.info["adacomp_history"]`` holds ``sqrt(L / tr(W G W^T))`` per
iteration, index 0 = the start).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods._linalg import Whitening, truncated_svd, whitened_truncate, whitening
from methods.components import LinearStats, check_choices, register
from methods.lowrank import Factorization
from methods.stack_of_batch import PAPER, StackedGrams
from methods.statistics import CompressedPrefixGrams, Statistic

log = logging.getLogger(__name__)

INITS = ("factorizer", "plain", "whitened")
INPUTS = ("compressed", "dense")
TARGETS = ("same", "dense")
SHRINKAGE = ("none", "norm")


@dataclass(frozen=True)
class PairedGrams:
    """The three Grams of the objective (module docstring), fp64.

    Attributes:
        gram: ``G: (n, n)``, the Gram of the inputs the target is computed on (only its trace term
            enters L).
        gram_hat: ``Hh = Xh Xh^T: (n, n)``, the Gram of the inputs the factors are fed.
        cross: ``C = X Xh^T: (n, n)`` (``Hh`` itself when the target is ``W Xh``).
        same_target: True when the target is the dense weight's output on the fitted inputs
            (``G = C = Hh``); then the V^T-step is the paper's ``B = A^+ W``.
    """

    gram: Tensor
    gram_hat: Tensor
    cross: Tensor
    same_target: bool = False

    @classmethod
    def same(cls, gram: Tensor) -> PairedGrams:
        """Target ``W X`` on the inputs X the factors are fed (``G = Hh = C``)."""
        g = gram.to(torch.float64)
        return cls(g, g, g, same_target=True)

    @classmethod
    def original(cls, gram: Tensor) -> PairedGrams:
        """Alias of :meth:`same` for the dense inputs ``Xh = X``."""
        return cls.same(gram)


def objective(weight: Tensor, a: Tensor, b: Tensor, grams: PairedGrams, wc: Tensor | None = None) -> float:
    """``L(A, B)`` from Grams (module docstring).

    Args:
        weight: ``W: (m, n)``.
        a: ``A: (m, k)``.
        b: ``B: (k, n)``.
        grams: ``G, Hh, C``.
        wc: ``W C: (m, n)`` if already computed.

    Returns:
        The squared error (a float, clamped at 0 against round-off).
    """
    w = weight.to(torch.float64)
    wc = w @ grams.cross if wc is None else wc
    gk = b @ grams.gram_hat @ b.T  # (k, k)
    val = ((a @ gk) * a).sum() - 2 * ((wc @ b.T) * a).sum() + ((w @ grams.gram) * w).sum()
    return max(float(val), 0.0)


def output_energy_ratio(weight: Tensor, a: Tensor, b: Tensor, grams: PairedGrams) -> float:
    """``||A B Xh||_F / ||W X||_F``: below 1 when the fitted layer shrinks its output (target's inputs X)."""
    w = weight.to(torch.float64)
    fitted = float((((a @ b) @ grams.gram_hat) * (a @ b)).sum().clamp(min=0))
    target = float(((w @ grams.gram) * w).sum().clamp(min=torch.finfo(torch.float64).tiny))
    return math.sqrt(fitted / target)


def _spd_solve_right(rhs: Tensor, gram: Tensor, ridge: float) -> Tensor:
    """``rhs G^{-1}`` for a small symmetric PSD ``G: (k, k)``; ridge relative to ``tr(G) / k`` if singular."""
    g = 0.5 * (gram + gram.T)
    scale = float(g.diagonal().mean().clamp(min=torch.finfo(torch.float64).tiny))
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
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
    """Exact minimiser in ``A`` with ``B`` fixed: ``A = W C B^T (B Hh B^T)^{-1}`` (Eq. (8)-(10)).

    Args:
        wc: ``W C: (m, n)``.
        b: ``B = V^T: (k, n)``.
        gram_hat: ``Hh: (n, n)``.
        ridge: Ridge of the ``(k, k)`` system relative to its mean diagonal, used only if it is singular.

    Returns:
        ``A: (m, k)``.
    """
    return _spd_solve_right(wc @ b.T, b @ gram_hat @ b.T, ridge)


def pinv_left(a: Tensor, mat: Tensor, ridge: float = 1e-10) -> Tensor:
    """``A^+ mat = (A^T A)^{-1} A^T mat`` for ``A: (m, k)``, through a Cholesky of the ``(k, k)`` Gram."""
    return _spd_solve_right(mat.T @ a, a.T @ a, ridge).T


def v_step(wc: Tensor, a: Tensor, white_hat: Whitening, ridge: float = 1e-10) -> Tensor:
    """Exact minimiser in ``B`` with ``A`` fixed for a target on other inputs: ``B = A^+ W C Hh^{-1}``.

    Args:
        wc: ``W C: (m, n)``.
        a: ``A = U: (m, k)``.
        white_hat: Whitening of ``Hh`` (gives ``Hh^{-1}`` by two triangular solves).
        ridge: Ridge of ``A^T A`` relative to its mean diagonal, used only if it is singular.

    Returns:
        ``B: (k, n)``.
    """
    return _gram_right_solve(pinv_left(a, wc, ridge), white_hat)


def v_step_same(weight: Tensor, a: Tensor, ridge: float = 1e-10) -> Tensor:
    """The paper's V^T-step, Eq. (13): ``B = A^+ W`` (exact for ``target=same`` whatever ``Hh``).

    Args:
        weight: ``W: (m, n)``.
        a: ``A = U: (m, k)``.
        ridge: Ridge of ``A^T A`` relative to its mean diagonal, used only if it is singular.

    Returns:
        ``B: (k, n)``.
    """
    return pinv_left(a, weight, ridge)


def balance(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Re-split ``A B`` as ``U_k S^{1/2}, S^{1/2} V_k^T`` (same product, balanced factor norms).

    Alternating steps leave the scale split between the factors arbitrary; the sqrt(sigma) split of
    Eq. (2) keeps half-precision factors well scaled. Cost ``O((m + n) k^2)``.

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
    """Run ``iters`` alternating (U-step, V^T-step) iterations (Eq. (16)); return the best iterate.

    Args:
        weight: ``W: (m, n)``.
        a: Start ``A: (m, k)``.
        b: Start ``B: (k, n)``.
        grams: ``G, Hh, C``.
        iters: Number of full iterations (tau); 0 returns the start.
        white_hat: Whitening of ``Hh`` if already computed (only a ``target=dense`` V^T-step uses it).
        ridge: Relative ridge of the ``(k, k)`` systems when singular.

    Returns:
        ``(A, B, history)``: the factors with the lowest objective among the start and the iterates,
        and ``history[t]`` = L after iteration t (``history[0]`` = start), full precision.
    """
    w = weight.to(torch.float64)
    a, b = a.to(torch.float64), b.to(torch.float64)
    wc = w @ grams.cross
    if iters > 0 and white_hat is None and not grams.same_target:
        white_hat = whitening(grams.gram_hat)
    best = (objective(w, a, b, grams, wc), a, b)
    history = [best[0]]
    for _ in range(iters):
        a = u_step(wc, b, grams.gram_hat, ridge)
        b = v_step_same(w, a, ridge) if grams.same_target else v_step(wc, a, white_hat, ridge)  # type: ignore[arg-type]
        loss = objective(w, a, b, grams, wc)
        history.append(loss)
        if loss < best[0]:
            best = (loss, a, b)
    return best[1], best[2], history


def reduced_rank_optimum(weight: Tensor, grams: PairedGrams, k: int) -> tuple[Tensor, Tensor]:
    """Global minimiser of L over rank-k ``W'`` (reduced-rank regression), for tests and reports.

    With ``Hh = Th Th^T``: ``L = ||W' Th - W C Th^{-T}||_F^2 + const``, so ``W' Th`` is the rank-k
    truncation of ``W C Th^{-T}``. For ``target=same`` (``C = Hh``) this is SVD-LLM's whitened
    truncation with the Gram of the fitted inputs.

    Returns:
        ``(A: (m, k), B: (k, n))``.
    """
    white = whitening(grams.gram_hat)
    target = _gram_right_solve(weight.to(torch.float64) @ grams.cross, white) @ white.factor  # W C Th^{-T}
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    root = s[:k].sqrt()
    return u[:, :k] * root, white.right_solve(root[:, None] * vh[:k])


def _as_int(value: object, what: str, low: int, also: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or int(value) < low:
        raise ValueError(f"adacomp.{what} must be an integer >= {low}{also}, got {value!r}")
    return int(value)


@register("refiner")
@dataclass(frozen=True)
class AdaCompRefiner:
    """adaComp (module docstring: the reading of every option and the paper passage it follows).

    Attributes:
        iters: Alternating iterations tau (default 1, Table 3(c)).
        init: Starting factors: ``factorizer`` (what the factorizer returned; ``adasvd`` starts from
            the whitened truncation, Algorithm 1), or recomputed at the same rank as ``plain``
            truncated SVD or ``whitened`` truncation of W (dense-input Gram). The received factors
            stay a candidate for the returned best, so the refiner never returns worse factors than
            it was given.
        inputs: ``compressed`` (default: the inputs of the model whose earlier blocks are already
            compressed, ``Xh``) or ``dense`` (the dense model's inputs).
        target: ``same`` (default: Eq. (4), the dense weight's output on the fitted inputs) or
            ``dense`` (the dense model's output ``W X``, regressed on ``Xh`` through the cross Gram).
        stack_of_batch: ``mini_bsz`` of the stack-of-batch approximation, Eq. (14)/(15): fit on the
            Grams of averaged groups of ``mini_bsz`` shuffled samples (``LinearStats.gram_stacked`` /
            ``gram_hat_stacked`` / ``cross_stacked``, collected by the statistics engine, which reads
            this field). ``0`` = off (default; ours, whatever the number of samples N), ``paper`` =
            the paper's rule ``mini_bsz = ceil(N / 32)`` (off for N <= 32, 8 for N = 256; resolved
            by the engine once N is known), or a fixed integer ``>= 2``.
        shrinkage: ``none`` (default) or ``norm``: after the refit, scale ``A`` so that the layer's
            output energy on the fitted inputs equals the target's (``||A B Xh|| = ||W X||``),
            undoing the shrinkage of least squares on noisy regressors. Not in the paper.
        ridge: Relative ridge of the ``(k, k)`` systems, applied only when one is singular.
    """

    name: ClassVar[str] = "adacomp"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"init": INITS, "inputs": INPUTS, "target": TARGETS,
                                                     "shrinkage": SHRINKAGE}
    iters: int = 1
    init: str = "factorizer"
    inputs: str = "compressed"
    target: str = "same"
    stack_of_batch: int | str = 0
    shrinkage: str = "none"
    ridge: float = 1e-10

    def __post_init__(self) -> None:
        check_choices(self)
        _as_int(self.iters, "iters", 0)
        if self.stack_of_batch != PAPER and _as_int(self.stack_of_batch, "stack_of_batch", 0, f" or {PAPER!r}") == 1:
            raise ValueError("adacomp.stack_of_batch must be 0 (off), an integer >= 2 or 'paper', got 1")
        if not 0.0 <= self.ridge < 1.0:
            raise ValueError(f"adacomp.ridge must lie in [0, 1), got {self.ridge!r}")

    @property
    def stacks(self) -> bool:
        """True when stack-of-batch may apply (a fixed ``mini_bsz`` or the paper's rule)."""
        return self.stack_of_batch == PAPER or int(self.stack_of_batch) > 0

    def statistics(self) -> tuple[Statistic, ...]:
        """Compressed-prefix Grams for ``inputs=compressed`` (or stacking, whose Grams the paired pass
        collects; with ``inputs=dense`` its extra Grams are unused) and the stacked Grams when
        ``stack_of_batch`` is set (``paper``: resolved by the engine, :func:`methods.statistics.for_samples`)."""
        paired = self.inputs == "compressed" or self.stacks
        out: list[Statistic] = [CompressedPrefixGrams()] if paired else []
        if self.stacks:
            size = PAPER if self.stack_of_batch == PAPER else int(self.stack_of_batch)
            out.append(StackedGrams(size, paired=paired))
        return tuple(out)

    def _stacked(self, stats: LinearStats) -> bool:
        """Whether to fit on stacked Grams. ``paper`` whose rule resolved to 1 (N <= 32) collected none:
        the plain Grams are then exactly what one-sample "groups" would give."""
        if self.stack_of_batch == PAPER:
            return stats.gram_stacked is not None
        return self.stacks

    def grams(self, stats: LinearStats) -> PairedGrams:
        """The Grams this configuration fits on (raises if the engine did not collect them)."""
        stacked = self._stacked(stats)
        gram = stats.gram_stacked if stacked else stats.gram
        gram_hat = stats.gram_hat_stacked if stacked else stats.gram_hat
        cross = stats.cross_stacked if stacked else stats.cross
        if stacked and gram is None:
            raise ValueError("adacomp.stack_of_batch needs stacked Grams from the statistics engine")
        if self.inputs == "dense":
            return PairedGrams.same(gram)  # type: ignore[arg-type]
        if gram_hat is None or (self.target == "dense" and cross is None):
            what = "stacked Grams" if stacked else "gram_hat and cross (paired statistics pass)"
            raise ValueError(f"adacomp.inputs=compressed needs {what}")
        if self.target == "same":
            return PairedGrams.same(gram_hat)
        return PairedGrams(gram.to(torch.float64), gram_hat.to(torch.float64), cross.to(torch.float64))  # type: ignore[union-attr]

    def _start(self, w: Tensor, fact: Factorization, stats: LinearStats) -> tuple[Tensor, Tensor]:
        if self.init == "plain":
            a0, b0, _ = truncated_svd(w, fact.rank)
        elif self.init == "whitened":
            a0, b0, _ = whitened_truncate(w, stats.whitening(), fact.rank)
        else:
            a0, b0 = fact.a.to(torch.float64), fact.b.to(torch.float64)
        return a0, b0

    def refine(self, weight: Tensor, fact: Factorization, stats: LinearStats) -> Factorization:
        """Refine ``fact`` of ``W: (m, n)`` at the same rank (storage unchanged)."""
        w = weight.to(torch.float64)
        grams = self.grams(stats)
        a0, b0 = self._start(w, fact, stats)
        # The dense whitening is cached on the stats: reuse it when the fitted inputs are the dense ones.
        white_hat = stats.whitening() if self.inputs == "dense" and not self._stacked(stats) else None
        a, b, history = alternate(w, a0, b0, grams, int(self.iters), white_hat=white_hat, ridge=self.ridge)
        best = min(history)
        returned = "iterate"
        if self.init != "factorizer":
            given = objective(w, fact.a.to(torch.float64), fact.b.to(torch.float64), grams)
            if given < best:
                a, b, best, returned = fact.a.to(torch.float64), fact.b.to(torch.float64), given, "input"
        energy_ratio = output_energy_ratio(w, a, b, grams)
        if self.shrinkage == "norm" and energy_ratio > 0:
            a = a / energy_ratio
        a, b, _ = balance(a, b)
        energy = max(objective(w, a[:, :0], b[:0], grams), torch.finfo(torch.float64).tiny)  # tr(W G W^T)
        info = dict(fact.info)
        info.update(
            adacomp_history=[float(f"{(h / energy) ** 0.5:.6g}") for h in history],
            adacomp_best_iter=history.index(min(history)),
            adacomp_returned=returned,
            adacomp_output_ratio=float(f"{energy_ratio:.6g}"),
        )
        log.debug("adacomp rel. error %.4g -> %.4g", (history[0] / energy) ** 0.5, (best / energy) ** 0.5)
        return Factorization(a, b, spectrum=fact.spectrum, info=info)
