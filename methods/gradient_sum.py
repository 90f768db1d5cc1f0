"""Calibration sum of each target weight's gradient (not squared): what ZS-SVD's sensitivities need.

ZS-SVD (arXiv 2602.02848; official code ``compression/gradient.py``) scores singular components with
the **mean** gradient of the next-token loss over the calibration set,

    G = (1 / N) sum_d dL_d/dW   (m, n),

``L_d`` the mean next-token NLL of calibration window ``d`` (the engine's gradient pass,
``harness/engine/gradients.py``, one forward and one backward per window). This statistic keeps the
sum and the window count; :func:`mean_gradient` divides. The official code averages per batch of its
data loader; with one window per backward the two agree for equal-length windows.

Storage: one ``(m, n)`` tensor per target linear, i.e. **as large as the weights themselves** (and on
disk in the store's dtype: float64 by default, four times a float16 model's target weights). During
the pass every accumulator lives on the compute device at once, in float32 (the official code also
sums in float32): twice a float16 model's target weights on the device, on top of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from methods.statistics import Accumulator, GramProduct

if TYPE_CHECKING:
    from methods.components import LinearStats


class _GradSumAcc:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.total: Tensor | None = None
        self.windows = 0

    def add(self, x: Tensor, mask: Tensor | None, batch: int, xh: Tensor | None = None) -> None:
        grad = x.detach()  # (m, n) gradient of one window's loss; the engine frees it after this call
        if self.total is None:
            self.total = torch.zeros(grad.shape, dtype=torch.float32, device=self.device)
        self.total += grad.to(device=self.device, dtype=torch.float32)
        self.windows += 1

    def result(self) -> dict[str, Tensor]:
        if self.total is None:
            raise ValueError("gradient sum: no calibration window was seen")
        return {"grad_sum": self.total, "grad_windows": torch.tensor(self.windows, dtype=torch.int64)}


@dataclass(frozen=True)
class GradientSum:
    """``sum_d dL_d/dW: (m, n)`` and the number of windows, per target linear (module docstring)."""

    scope: ClassVar[str] = "gradient"
    stream: ClassVar[str] = "dense"
    names: ClassVar[tuple[str, ...]] = ("grad_sum", "grad_windows")
    requires_causal_lm: ClassVar[str] = "its sensitivities are gradients of the next-token loss"

    @property
    def key(self) -> str:
        return "gradient-sum"

    def accumulator(self, n: int, device: torch.device, product: GramProduct) -> Accumulator:
        return _GradSumAcc(device)


def mean_gradient(stats: LinearStats) -> Tensor:
    """``G = grad_sum / grad_windows: (m, n)`` float64, the mean calibration gradient of one weight.

    Raises:
        ValueError: when the statistic is absent (the component must declare :class:`GradientSum`).
        FloatingPointError: when it is non-finite.
    """
    total, windows = stats.get("grad_sum"), stats.get("grad_windows")
    if total is None or windows is None:
        raise ValueError("needs the gradient-sum statistic (declare GradientSum; run it through the harness)")
    if int(windows) <= 0:
        raise ValueError("gradient sum over zero calibration windows")
    grad = total.to(torch.float64) / int(windows)
    if not torch.isfinite(grad).all():
        raise FloatingPointError("the mean calibration gradient has non-finite entries")
    return grad
