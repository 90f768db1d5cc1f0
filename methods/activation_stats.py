"""Per-input-channel mean absolute activation: the statistic behind ASVD's scaling (arXiv 2312.05821).

For a target linear with inputs ``x_t: (n,)`` (dense model, real tokens only) it accumulates

    a_j = (1 / T) sum_t |x_{t, j}|,    j = 1..n

ASVD's ``abs_mean`` sums per-batch means over batches instead; with equal batches the two differ by a
constant factor, which the scaling cancels (the truncation of ``W diag(c s)`` is ``c`` times that of
``W diag(s)``, undone on ``V``). One accumulator per distinct input (q/k/v share one), float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods.statistics import Accumulator, GramProduct, flat_tokens


class _AbsMeanAcc:
    def __init__(self, n: int, device: torch.device) -> None:
        self.total = torch.zeros(n, dtype=torch.float64, device=device)
        self.tokens = 0

    def add(self, x: Tensor, mask: Tensor | None, batch: int, xh: Tensor | None = None) -> None:
        rows = flat_tokens(x, mask)
        self.total += rows.float().abs().sum(dim=0).double()
        self.tokens += rows.shape[0]

    def result(self) -> dict[str, Tensor]:
        return {"input_abs_mean": self.total / max(self.tokens, 1)}


@dataclass(frozen=True)
class InputAbsMean:
    """``a: (n,)``, the mean over calibration tokens of ``|x_j|`` per input channel (module docstring)."""

    scope: ClassVar[str] = "linear-input"
    stream: ClassVar[str] = "dense"
    names: ClassVar[tuple[str, ...]] = ("input_abs_mean",)

    @property
    def key(self) -> str:
        return "input-abs-mean"

    def accumulator(self, n: int, device: torch.device, product: GramProduct) -> Accumulator:
        return _AbsMeanAcc(n, device)
