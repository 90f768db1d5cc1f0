"""GFWSVD, Generalized Fisher-Weighted SVD (Chekalina et al., arXiv 2505.17974): ``gfwsvd`` = uniform
+ kronecker-fisher.

FWSVD (:mod:`methods.fwsvd`) keeps only one Fisher weight per output row. GFWSVD approximates the
whole observed Fisher of a weight ``W: (m, n)`` by a Kronecker product ``A kron B`` (``A: (n, n)``
input side, ``B: (m, m)`` output side, :class:`methods.kronecker.KroneckerFisher`: the nearest
Kronecker product of the per-sample gradients' outer products), so the Fisher-weighted error is

    vec(W - W')^T (A kron B) vec(W - W') = ||L_B^T (W - W') L_A||_F^2,   A = L_A L_A^T,  B = L_B L_B^T

and its rank-k minimiser one SVD (:func:`methods._linalg.two_sided_truncate`):
``L_B^T W L_A = U S V^T``, ``W' = L_B^{-T} U_k S_k V_k^T L_A^{-1}``, split with ``S_k^{1/2}``.

Damping, as the official code's main branch (``llama/compress_llama_with_kronsvd_llama2.py``, which
LEMS's port cites): each factor is Cholesky-factored as it is; only when that fails it is shrunk,
``F <- (1 - alpha) F + alpha mean(diag F) I`` with ``alpha = 1e-4, 1e-3, ...`` (ten times more per
try; capped at 1, where ``F`` is a multiple of ``I`` and always positive definite). The release
branch's eigendecomposition (``F + lambda diag(F)``, ``lambda`` doubled from 1e-6) is not
implemented. Rank: the uniform rule ``floor(keep m n / (m + n))`` (the official code rounds up to a
multiple of 8 from per-layer ratios; LEMS floors). Needs a causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from methods._linalg import two_sided_truncate
from methods.components import LinearStats, check_choices, register
from methods.kronecker import ESTIMATORS, KroneckerFisher, damped_cholesky
from methods.lowrank import Factorization
from methods.method import register_method


def shrink_schedule(first: float, growth: float, tries: int) -> tuple[float, ...]:
    """``(0, first, first growth, ...)``, ``tries`` shrinkages after the undamped try, capped at 1."""
    out = [0.0]
    for i in range(tries):
        alpha = min(1.0, first * growth ** i)
        out.append(alpha)
        if alpha >= 1.0:
            break
    return tuple(out)


@register("factorizer")
@dataclass(frozen=True)
class KroneckerFisherFactorizer:
    """GFWSVD's two-sided Fisher-whitened truncation (module docstring).

    Options:
        estimator: How the Kronecker factors are estimated (``nearest-kronecker``, the official
            code; ``one-step``: its first power step, streamed, for models whose gradient samples do
            not fit on the device). See :class:`methods.kronecker.KroneckerFisher`.
        group: Calibration windows averaged into one gradient sample (1: per window, the observed
            Fisher's definition; the official scripts use 32 to bound disk).
        tol: Convergence of the nearest-Kronecker power iteration.
        max_iter: Its step limit.
        shrink: The first shrinkage tried when a factor is not positive definite (official main branch: 1e-4).
        shrink_growth: Factor between successive shrinkages (official: 10).
        max_tries: Shrinkages tried before giving up (official: 10; the schedule stops at 1).
    """

    name: ClassVar[str] = "kronecker-fisher"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"estimator": ESTIMATORS}
    estimator: str = "nearest-kronecker"
    group: int = 1
    tol: float = 1e-6
    max_iter: int = 100
    shrink: float = 1e-4
    shrink_growth: float = 10.0
    max_tries: int = 10

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0.0 < self.shrink <= 1.0 or self.shrink_growth <= 1.0 or self.max_tries < 1:
            raise ValueError(f"need 0 < shrink <= 1, shrink_growth > 1, max_tries >= 1; got {self.shrink}, "
                             f"{self.shrink_growth}, {self.max_tries}")
        self.statistics()  # validates the statistic's options now, not at collection time

    def statistics(self) -> tuple[KroneckerFisher, ...]:
        return (KroneckerFisher(self.estimator, self.group, self.tol, self.max_iter),)

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization:
        out, inn = stats.get("kron_fisher_out"), stats.get("kron_fisher_in")
        if out is None or inn is None:
            raise ValueError("kronecker-fisher needs the kronecker-fisher statistic (run it through the harness)")
        schedule = shrink_schedule(self.shrink, self.shrink_growth, self.max_tries)
        left, alpha_out = damped_cholesky(out, schedule, "output-side (B)")
        right, alpha_in = damped_cholesky(inn, schedule, "input-side (A)")
        a, b, s = two_sided_truncate(weight, left, right, rank)
        info: dict[str, object] = {"shrink_out": alpha_out, "shrink_in": alpha_in}
        steps = stats.get("kron_fisher_steps")
        if steps is not None:
            info["kron_steps"] = int(steps)
        return Factorization(a, b, spectrum=s, info=info)


register_method("gfwsvd", "uniform", "kronecker-fisher")
