"""Vanilla SVD (Eckart-Young truncation of each weight, the baseline of every paper here): ``svd`` = uniform allocator + plain factorizer.

Eckart-Young: the rank-k truncation of ``W = U S V^T`` minimises ``||W - W'||_F`` and its error is
``sqrt(sum_{i>k} s_i^2)``. It ignores the data, which is why it collapses on real LLMs (LLaMA-7B at
20 %: WikiText-2 perplexity about 2e4) and is kept as the sanity floor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from methods._linalg import truncated_svd
from methods.components import LinearStats, register
from methods.lowrank import Factorization


@register("factorizer")
@dataclass(frozen=True)
class PlainFactorizer:
    """Truncated SVD of the weight alone; calibration statistics are not used."""

    name: ClassVar[str] = "plain"

    def factorize(self, weight: Tensor, stats: LinearStats | None, rank: int) -> Factorization:
        a, b, sigma = truncated_svd(weight, rank)
        return Factorization(a, b, spectrum=sigma)
