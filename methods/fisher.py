"""Diagonal empirical Fisher of each target weight, summed along rows and along columns (FWSVD).

FWSVD (Hsu et al., arXiv 2207.00112, Sec. 3.1) weighs each weight by its Fisher information
``I_{w} = E_d[(dL(d)/dw)^2]``, estimated from the squared gradients of the loss of each calibration
sample. For ``W: (m, n)`` this statistic keeps the two sums the factorizer can use in closed form:

    fisher_rows[i] = sum_d sum_j G_d[i, j]^2   (m,)      fisher_cols[j] = sum_d sum_i G_d[i, j]^2   (n,)

with ``G_d = dL_d/dW`` for calibration window ``d`` and ``L_d`` its mean next-token NLL. Both sums
cost ``m + n`` numbers per module, so one pass serves either weighting. The engine computes it with
one forward and one backward per window, the whole model on the compute device, freeing each
weight's gradient as soon as it is produced (``harness/engine/gradients.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods.statistics import Accumulator, GramProduct


class _SquaredGradAcc:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rows: Tensor | None = None
        self.cols: Tensor | None = None
        self.windows = 0

    def add(self, x: Tensor, mask: Tensor | None, batch: int, xh: Tensor | None = None) -> None:
        sq = x.detach().float().pow(2)  # (m, n) gradient of one window's loss
        rows, cols = sq.sum(dim=1).double(), sq.sum(dim=0).double()
        if self.rows is None or self.cols is None:
            self.rows, self.cols = rows.to(self.device), cols.to(self.device)
        else:
            self.rows += rows
            self.cols += cols
        self.windows += 1

    def result(self) -> dict[str, Tensor]:
        if self.rows is None or self.cols is None:
            raise ValueError("squared gradients: no calibration window was seen")
        return {"fisher_rows": self.rows, "fisher_cols": self.cols,
                "fisher_windows": torch.tensor(self.windows, dtype=torch.int64)}


@dataclass(frozen=True)
class SquaredGradients:
    """Row and column sums of the squared weight gradients, per target linear (module docstring)."""

    scope: ClassVar[str] = "gradient"
    stream: ClassVar[str] = "dense"
    names: ClassVar[tuple[str, ...]] = ("fisher_rows", "fisher_cols", "fisher_windows")
    requires_causal_lm: ClassVar[str] = "its Fisher weights are squared gradients of the next-token loss"

    @property
    def key(self) -> str:
        return "squared-gradients"

    def accumulator(self, n: int, device: torch.device, product: GramProduct) -> Accumulator:
        return _SquaredGradAcc(device)
