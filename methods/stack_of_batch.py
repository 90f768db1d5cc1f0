"""AdaSVD's stack-of-batch Grams (Li et al., arXiv 2502.01403, adaComp; docs/methods/adasvd.md).

The calibration samples are shuffled and consecutive groups of ``mini_bsz`` samples are averaged
position by position into one "stacked" sample, ``xbar_j = (1 / mini_bsz) sum_i x_{(j-1) mini_bsz + i}``;
adaComp then fits on the Grams of these fewer, averaged samples. Averaging activations is not the
same as summing Grams (``sum x x^T != (sum x)(sum x)^T``): it is the paper's deliberate
approximation to fit more raw samples in the same memory.

The permutation of each batch comes from a generator seeded by ``seed`` and the batch index, so the
dense and compressed streams and every block see the same groups. Groups may span batches; an
incomplete last group is dropped. Padded (masked) batches are refused: averaging needs aligned
positions.

The paper's group size (``mini_bsz="paper"``): ``mini_bsz = ceil(N / M)`` for ``N`` calibration
samples, ``M`` the number of samples that fit the GPU in one update (32 on their A100, so 8 for
their N = 256). Grams cost no memory per sample here, so ``M`` is fixed at the paper's 32: the rule
then stacks the same way on every machine. It needs ``N``, which only the engine knows once the
calibration is drawn: the engine calls :meth:`StackedGrams.for_samples`
(:func:`methods.statistics.for_samples`) before collecting, and a rule that gives 1 (``N <= 32``)
collects nothing, i.e. stacking is off.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods.statistics import Accumulator, GramProduct

PAPER = "paper"
PAPER_FIT = 32  # M: samples per update on the paper's A100 (Sec. 3.1, stack-of-batch)


def paper_mini_bsz(n_samples: int, fit: int = PAPER_FIT) -> int:
    """AdaSVD's stack-of-batch group size ``mini_bsz = ceil(N / M)`` (1 means nothing is stacked).

    Args:
        n_samples: ``N``, the number of calibration samples (windows).
        fit: ``M``, the samples that fit one update (the paper's 32).

    Returns:
        ``ceil(N / M)``, at least 1: 1 for ``N <= 32``, 8 for ``N = 256``.
    """
    if n_samples < 1 or fit < 1:
        raise ValueError(f"stack-of-batch needs N >= 1 samples and M >= 1, got N={n_samples}, M={fit}")
    return max(1, math.ceil(n_samples / fit))


def batch_permutation(size: int, seed: int, batch: int) -> Tensor:
    """The sample order of one batch (CPU int64), the same wherever it is asked for."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 100_003 + batch))


class _StackAcc:
    def __init__(self, n: int, device: torch.device, product: GramProduct, mini_bsz: int, seed: int,
                 paired: bool) -> None:
        self.mini_bsz, self.seed, self.paired, self.product = mini_bsz, seed, paired, product
        self.pending: list[Tensor] = []  # (seq, n) samples of the dense stream, permuted
        self.pending_hat: list[Tensor] = []
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.gram_hat = torch.zeros_like(self.gram) if paired else None
        self.cross = torch.zeros_like(self.gram) if paired else None
        self.groups = 0

    def add(self, x: Tensor, mask: Tensor | None, batch: int, xh: Tensor | None = None) -> None:
        if mask is not None:
            raise ValueError("stack-of-batch averages whole samples; it does not support padded (masked) batches")
        perm = batch_permutation(x.shape[0], self.seed, batch).to(x.device)
        self.pending.extend(x[perm].float().unbind(0))
        if self.paired:
            if xh is None:
                raise ValueError("paired stack-of-batch Grams need the compressed-stream input")
            self.pending_hat.extend(xh[perm].float().unbind(0))
        while len(self.pending) >= self.mini_bsz:
            xs = torch.stack(self.pending[: self.mini_bsz]).mean(0)  # (seq, n): positions aligned
            del self.pending[: self.mini_bsz]
            self.gram += self.product(xs, xs)
            if self.paired:
                xhs = torch.stack(self.pending_hat[: self.mini_bsz]).mean(0)
                del self.pending_hat[: self.mini_bsz]
                self.gram_hat += self.product(xhs, xhs)  # type: ignore[operator]
                self.cross += self.product(xs, xhs)  # type: ignore[operator]
            self.groups += 1

    def result(self) -> dict[str, Tensor]:
        if self.groups == 0:
            raise ValueError(f"stack-of-batch mini_bsz={self.mini_bsz} exceeds the number of calibration samples")
        out = {"gram_stacked": self.gram}
        if self.paired:
            out.update(gram_hat_stacked=self.gram_hat, cross_stacked=self.cross)  # type: ignore[arg-type]
        return out


@dataclass(frozen=True)
class StackedGrams:
    """Grams of averaged groups of ``mini_bsz`` shuffled samples (module docstring).

    Attributes:
        mini_bsz: Samples per stacked group (>= 2), or ``"paper"``: ``ceil(N / 32)``, resolved by
            :meth:`for_samples` once the number of calibration samples is known.
        seed: Seed of the per-batch shuffles.
        paired: Also the compressed stream's stacked Gram and the dense-by-compressed cross Gram
            (``gram_hat_stacked``, ``cross_stacked``); otherwise only ``gram_stacked`` (dense stream,
            cacheable).
    """

    mini_bsz: int | str
    seed: int = 0
    paired: bool = False
    scope: ClassVar[str] = "linear-input"
    names_dense: ClassVar[tuple[str, ...]] = ("gram_stacked",)
    names_paired: ClassVar[tuple[str, ...]] = ("gram_stacked", "gram_hat_stacked", "cross_stacked")

    @property
    def stream(self) -> str:  # type: ignore[override]
        return "paired" if self.paired else "dense"

    @property
    def names(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.names_paired if self.paired else self.names_dense

    @property
    def key(self) -> str:
        return f"stacked-grams[mini_bsz={self.mini_bsz},seed={self.seed},paired={int(self.paired)}]"

    @property
    def depends_on_samples(self) -> bool:
        """True while ``mini_bsz`` is the paper's rule, i.e. until :meth:`for_samples` resolves it."""
        return self.mini_bsz == PAPER

    def for_samples(self, n_samples: int) -> StackedGrams | None:
        """This statistic for ``n_samples`` calibration samples: the paper's rule resolved to its group
        size, or None when it gives 1 (nothing to stack); a fixed ``mini_bsz`` is returned as is."""
        if self.mini_bsz != PAPER:
            return self
        size = paper_mini_bsz(n_samples)
        return None if size < 2 else dataclasses.replace(self, mini_bsz=size)

    def accumulator(self, n: int, device: torch.device, product: GramProduct) -> Accumulator:
        if isinstance(self.mini_bsz, str):
            raise RuntimeError(f"stack-of-batch mini_bsz={self.mini_bsz!r} depends on the number of calibration "
                               "samples: resolve it with for_samples(N) before collecting")
        return _StackAcc(n, device, product, self.mini_bsz, self.seed, self.paired)
