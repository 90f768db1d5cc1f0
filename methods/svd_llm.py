"""SVD-LLM (Wang et al., arXiv 2403.07378), truncation-aware whitening only: ``svd-llm`` = uniform + whitened.

Truncation-aware data whitening (Wang et al., ICLR 2025, Theorem 3.2): with ``H = X X^T = T T^T``
the rank-k truncation of ``W T`` followed by ``T^{-1}`` minimises ``||(W - W') X||_F`` and each
dropped whitened singular value ``s_i`` costs exactly ``s_i^2`` of squared output error. The LoRA
parameter-update stage of the paper is out of scope: compare against "SVD-LLM (W)" numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from methods._linalg import whitened_truncate
from methods.components import LinearStats, register
from methods.lowrank import Factorization


@register("factorizer")
@dataclass(frozen=True)
class WhitenedFactorizer:
    """Cholesky (float64, eigenvalue fallback) whitening of the dense inputs' Gram, then SVD."""

    name: ClassVar[str] = "whitened"

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization:
        white = stats.whitening()
        a, b, s = whitened_truncate(weight, white, rank)
        info: dict[str, object] = {"whitening": white.method}
        if white.method != "cholesky":
            info["clamped_eigenvalues"] = white.clamped
        return Factorization(a, b, spectrum=s, info=info)
