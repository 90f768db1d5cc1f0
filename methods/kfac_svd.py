"""KFAC-SVD (LEMS harness, ICML 2026; code github.com/lems-svd/lems, no licence: read, not copied):
``kfac-svd`` = uniform + kfac-whitened.

K-FAC's curvature of a linear ``y = W x`` is ``E[x x^T] kron E[delta delta^T]``, ``delta = dL/dy``:
the input Gram ``H = sum_t x_t x_t^T: (n, n)`` (the dense Gram every run collects) and the
output-gradient Gram ``G = sum_t delta_t delta_t^T: (m, m)``
(:class:`methods.kronecker.OutputGradientGram`), both over tokens. Each is shrunk toward the scaled
identity, ``F <- (1 - alpha) F + alpha mean(diag F) I`` (LEMS, LLMs: ``alpha = 0.1`` on ``H``, ``0.3`` on
``G``; 0.7 on ``G`` for vision), Cholesky-factored (``H = L_H L_H^T``, ``G = L_G L_G^T``), and

    L_G^T W L_H = U S V^T,   W' = L_G^{-T} U_k S_k V_k^T L_H^{-1}

minimises ``||L_G^T (W - W') L_H||_F^2 = tr((W - W')^T G (W - W') H)``, the K-FAC quadratic model of
the loss increase (:func:`methods._linalg.two_sided_truncate`). LEMS's code whitens the left side
with ``L_G`` instead of ``L_G^T`` (``row_scale @ W @ column_scale`` with both lower-triangular), which
minimises ``tr(D^T L_G^T L_G D H)`` instead: ``left=untransposed`` reproduces it; the default follows
the K-FAC objective (and GFWSVD's official code, which uses the transpose).

What differs from GFWSVD (:mod:`methods.gfwsvd`): the factors are token-level second moments of
activations and output gradients (``H`` over every token, full rank from one window), not the nearest
Kronecker product of a few window-level weight gradients; and the damping is a fixed shrinkage, not
a last resort. Rank: uniform, ``floor(keep m n / (m + n))`` (LEMS: ``int(int(m n / (m + n)) keep)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from methods._linalg import two_sided_truncate
from methods.components import LinearStats, check_choices, register
from methods.kronecker import OutputGradientGram, damped_cholesky
from methods.lowrank import Factorization
from methods.method import register_method

LEFT = ("transpose", "untransposed")


@register("factorizer")
@dataclass(frozen=True)
class KfacFactorizer:
    """K-FAC two-sided whitened truncation (module docstring).

    Options:
        input_shrink: Shrinkage of the input Gram ``H`` toward ``mean(diag H) I`` (LEMS: 0.1).
        output_shrink: Shrinkage of the output-gradient Gram ``G`` (LEMS, language models: 0.3).
        left: ``transpose`` (whiten with ``L_G^T``: the K-FAC objective) or ``untransposed`` (with
            ``L_G``, as LEMS's code does).
        edge_fraction: Output gradients of the first and last fraction of each window are left out
            of ``G`` (LEMS: 0.125).
        clip: Clip token gradient norms to ``[clip_min, clip_max]`` times their window's mean (LEMS: yes).
        clip_min: Lower clip (LEMS: 0.1).
        clip_max: Upper clip (LEMS: 10).
    """

    name: ClassVar[str] = "kfac-whitened"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"left": LEFT}
    input_shrink: float = 0.1
    output_shrink: float = 0.3
    left: str = "transpose"
    edge_fraction: float = 0.125
    clip: bool = True
    clip_min: float = 0.1
    clip_max: float = 10.0

    def __post_init__(self) -> None:
        check_choices(self)
        for alpha in (self.input_shrink, self.output_shrink):
            if not 0.0 <= alpha <= 1.0:
                raise ValueError(f"shrinkage must lie in [0, 1], got {alpha}")
        self.statistics()  # validates the statistic's options now

    def statistics(self) -> tuple[OutputGradientGram, ...]:
        return (OutputGradientGram(self.edge_fraction, self.clip, self.clip_min, self.clip_max),)

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization:
        grad_gram = stats.get("grad_out_gram")
        if grad_gram is None:
            raise ValueError("kfac-whitened needs the output-gradient Gram statistic (run it through the harness)")
        # q/k/v (gate/up) share the input Gram: one damped whitening per input group.
        right, _ = stats.cached(f"kfac-input-shrink={self.input_shrink!r}",
                                lambda: damped_cholesky(stats.gram, (self.input_shrink,), "input-side (H)"))
        left, _ = damped_cholesky(grad_gram, (self.output_shrink,), "output-side (G)")
        a, b, s = two_sided_truncate(weight, left, right, rank, left_transposed=self.left == "transpose")
        return Factorization(a, b, spectrum=s)


register_method("kfac-svd", "uniform", "kfac-whitened")
