"""SVD-LLM (Wang et al., arXiv 2403.07378), truncation-aware whitening only: ``svd-llm`` = uniform + whitened.

Truncation-aware data whitening (Wang et al., ICLR 2025, Theorem 3.2): with ``H = X X^T = T T^T``
the rank-k truncation of ``W T`` followed by ``T^{-1}`` minimises ``||(W - W') X||_F`` and each
dropped whitened singular value ``s_i`` costs exactly ``s_i^2`` of squared output error. The LoRA
parameter-update stage of the paper is out of scope: compare against "SVD-LLM (W)" numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from methods._linalg import WhitenedSpectrum
from methods.components import LinearStats, register
from methods.lowrank import Factorization


@register("factorizer")
@dataclass(frozen=True)
class WhitenedFactorizer:
    """Cholesky (float64, eigenvalue fallback) whitening of the dense inputs' Gram, then SVD."""

    name: ClassVar[str] = "whitened"

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization:
        return self.nested(weight, stats, rank)(rank)

    def nested(self, weight: Tensor, stats: LinearStats, max_rank: int) -> Callable[[int], Factorization]:
        """The factorization at every rank ``k <= max_rank`` of ``W: (m, n)`` from one SVD of ``W T``
        (what a probe that tries many ranks of one matrix calls, e.g. Duo-SVD's KL sensitivity)."""
        white = stats.whitening()
        spectrum = WhitenedSpectrum.of(weight, white, max_rank)
        info: dict[str, object] = {"whitening": white.method}
        if white.method != "cholesky":
            info["clamped_eigenvalues"] = white.clamped

        def at(k: int) -> Factorization:
            a, b, s = spectrum.truncate(k)
            return Factorization(a, b, spectrum=s, info=info)

        return at
