"""Block input/output similarity: the statistic behind AdaSVD's adaCR (arXiv 2502.01403; docs/methods/adasvd.md).

Per decoder block, the mean over calibration tokens of ``cos(x_in, x_out)`` between the block's input
and output hidden states (padding excluded). A block that changes the residual stream little has a
cosine near 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods.statistics import Accumulator, GramProduct


class _CosineAcc:
    def __init__(self) -> None:
        self.total, self.count = 0.0, 0

    def add(self, x: Tensor, mask: Tensor | None, batch: int, xh: Tensor | None = None) -> None:
        cos = torch.nn.functional.cosine_similarity(x.float(), xh.float(), dim=-1)  # type: ignore[union-attr]
        if mask is not None:
            cos = cos[mask]
        self.total += float(cos.sum())
        self.count += int(cos.numel())

    def result(self) -> dict[str, Tensor]:
        return {"block_cosine": torch.tensor(self.total / max(self.count, 1), dtype=torch.float64)}


@dataclass(frozen=True)
class BlockCosine:
    """Mean over tokens of ``cos(block input, block output)`` per block (module docstring)."""

    scope: ClassVar[str] = "block"
    stream: ClassVar[str] = "dense"
    names: ClassVar[tuple[str, ...]] = ("block_cosine",)

    @property
    def key(self) -> str:
        return "block-cosine"

    def accumulator(self, n: int, device: torch.device, product: GramProduct) -> Accumulator:
        return _CosineAcc()
