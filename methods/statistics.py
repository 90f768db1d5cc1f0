"""Calibration statistics that components declare, and how each is accumulated.

A component (allocator, factorizer or refiner) lists what it needs in ``statistics()``; the engine
collects exactly the union of what the chosen method declares, and knows no statistic by name. A
statistic owns its accumulation code (as GPTQ's algorithm owns its ``add_batch``): the engine only
hands it activations, one batch at a time, on the compute device.

Three kinds, by what the engine feeds them:

* ``scope = "linear-input"``, ``stream = "dense"``: the input ``x: (batch, seq, n)`` of a target
  linear in the dense model. Linears that read the same tensor (q/k/v, gate/up) share one
  accumulator: one statistic per distinct input.
* ``scope = "linear-input"``, ``stream = "paired"``: token-aligned pairs ``(x, xh)``, where ``xh``
  is the same linear's input in the model whose earlier blocks are already compressed. Only
  collected while compressing (they depend on the method and ratio), never cached.
* ``scope = "block"``, ``stream = "dense"``: a decoder block's input and output hidden states.
* ``scope = "gradient"``, ``stream = "dense"``: the gradient ``dL/dW: (m, n)`` of each target weight
  of the next-token loss of one calibration window (``x`` in :meth:`Accumulator.add`, ``mask`` None),
  one accumulator per target linear (not per distinct input). Computed by whole-model backward
  passes (``harness/engine/gradients.py``), so only on causal LMs: such a statistic declares
  ``requires_causal_lm`` (why it needs one), which refuses encoder runs before the model loads.

Every accumulator returns named tensors (``result()``); names are unique across statistics, and
:class:`methods.components.LinearStats` exposes them to the components. Dense-stream results are
cached on disk by the engine, keyed by the statistic's ``key`` (which includes its options).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol

import torch
from torch import Tensor

from methods._linalg import paired_output_error

if TYPE_CHECKING:
    from methods.components import LinearStats


class Accumulator(Protocol):
    """Running state of one statistic for one distinct input (or one block)."""

    def add(self, x: Tensor, mask: Tensor | None, batch: int, xh: Tensor | None = None) -> None:
        """Add one batch.

        Args:
            x: ``(batch, seq, n)`` dense-stream activations (block scope: the block input).
            mask: ``(batch, seq)`` bool, True for tokens that count (padding is False), or None.
            batch: Index of the batch in the calibration set (same in both streams and every block).
            xh: Paired statistics: the compressed-stream input ``(batch, seq, n)``. Block scope:
                the block output.
        """
        ...

    def result(self) -> dict[str, Tensor]:
        """Named results (on the accumulation device)."""
        ...


class Statistic(Protocol):
    """What a component declares (frozen dataclass; its fields are options that enter ``key``).

    ``scope`` is ``"linear-input"``, ``"block"`` or ``"gradient"``, ``stream`` is ``"dense"`` or
    ``"paired"`` and ``names`` lists the result names; each may be a class attribute or a property of
    the options.
    """

    scope: str
    stream: str
    names: tuple[str, ...]

    @property
    def key(self) -> str:
        """Stable identity including options (cache key, record entry)."""
        ...

    def accumulator(self, n: int, device: torch.device, product: GramProduct) -> Accumulator:
        """A fresh accumulator for inputs of width ``n`` on ``device``.

        A statistic may also define ``report(weight, approx, stats, energy) -> dict[str, float]``:
        facts about a compressed layer that only it can compute, added to the layer's record.
        """
        ...


@dataclass(frozen=True)
class GramProduct:
    """How ``x^T x`` of one batch is computed before it is added to a float64 sum.

    Chosen once per run by the engine's measured precision check (``mode`` in the record):

    * ``float32``: ``x.float().T @ x.float()`` (TF32 off). The CPU path.
    * ``half-to-float32``: half-precision inputs, float32 output and accumulation inside the GEMM
      (``torch.mm(..., out_dtype=torch.float32)``, CUDA only); about 10x the float32 rate.
    * ``float64``: ``x.double().T @ x.double()``.
    """

    mode: str = "float32"

    def __call__(self, a: Tensor, b: Tensor) -> Tensor:
        """``a^T b`` for ``a: (tokens, n)``, ``b: (tokens, p)`` as float64 ``(n, p)``."""
        if self.mode == "half-to-float32":
            return torch.mm(a.T, b, out_dtype=torch.float32).double()
        if self.mode == "float64":
            return a.double().T @ b.double()
        return (a.float().T @ b.float()).double()


def flat_tokens(x: Tensor, mask: Tensor | None) -> Tensor:
    """``(tokens, n)`` rows of ``x: (batch, seq, n)`` whose mask is True (all rows without a mask)."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1)]


class _GramAcc:
    def __init__(self, n: int, device: torch.device, product: GramProduct) -> None:
        self.gram = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.tokens = 0
        self.product = product

    def add(self, x: Tensor, mask: Tensor | None, batch: int, xh: Tensor | None = None) -> None:
        rows = flat_tokens(x, mask)
        self.gram += self.product(rows, rows)
        self.tokens += rows.shape[0]

    def result(self) -> dict[str, Tensor]:
        return {"gram": self.gram, "tokens": torch.tensor(self.tokens, dtype=torch.int64)}


@dataclass(frozen=True)
class InputGram:
    """``H = sum_t x_t x_t^T: (n, n)`` over the dense model's inputs (float64) and the token count.

    The statistic every calibrated method starts from (SVD-LLM's whitening, ``||(W - W') X||_F^2 =
    tr((W - W') H (W - W')^T)``); the engine always collects it, because every record reports each
    layer's calibration output error.
    """

    scope: ClassVar[str] = "linear-input"
    stream: ClassVar[str] = "dense"
    names: ClassVar[tuple[str, ...]] = ("gram", "tokens")

    @property
    def key(self) -> str:
        return "gram"

    def accumulator(self, n: int, device: torch.device, product: GramProduct) -> Accumulator:
        return _GramAcc(n, device, product)


class _PairedAcc:
    def __init__(self, n: int, device: torch.device, product: GramProduct) -> None:
        self.gram_hat = torch.zeros(n, n, dtype=torch.float64, device=device)
        self.cross = torch.zeros_like(self.gram_hat)
        self.product = product

    def add(self, x: Tensor, mask: Tensor | None, batch: int, xh: Tensor | None = None) -> None:
        if xh is None:
            raise ValueError("compressed-prefix Grams need the paired (compressed-stream) input")
        rows, rows_hat = flat_tokens(x, mask), flat_tokens(xh, mask)
        self.gram_hat += self.product(rows_hat, rows_hat)
        self.cross += self.product(rows, rows_hat)

    def result(self) -> dict[str, Tensor]:
        return {"gram_hat": self.gram_hat, "cross": self.cross}


@dataclass(frozen=True)
class CompressedPrefixGrams:
    """``Hh = sum xh xh^T`` and ``C = sum x xh^T`` (both ``(n, n)``, float64).

    ``xh`` is the layer's input once the earlier blocks are compressed, token-aligned with the dense
    input ``x``. From them, ``||W' Xh - W X||_F^2 = tr(W' Hh W'^T) - 2 tr(W' C^T W^T) + tr(W H W^T)``:
    what a component needs to fit the dense output from the inputs a compressed model really gives.
    """

    scope: ClassVar[str] = "linear-input"
    stream: ClassVar[str] = "paired"
    names: ClassVar[tuple[str, ...]] = ("gram_hat", "cross")

    @property
    def key(self) -> str:
        return "compressed-prefix-grams"

    def accumulator(self, n: int, device: torch.device, product: GramProduct) -> Accumulator:
        return _PairedAcc(n, device, product)

    def report(self, weight: Tensor, approx: Tensor, stats: LinearStats, energy: float) -> dict[str, float]:
        """The layer's error on the inputs a compressed model gives it: ``||W' Xh - W X||_F / ||W X||_F``."""
        err = paired_output_error(weight, approx, stats.gram, stats.values["gram_hat"], stats.values["cross"])
        return {"calib_rel_error_compressed": err / energy}


def for_samples(declared: list[Statistic], n_samples: int) -> list[Statistic]:
    """``declared`` with the options that depend on the number of calibration samples resolved.

    A statistic whose options follow a rule in ``N`` (e.g. AdaSVD's stack-of-batch group size
    ``ceil(N / 32)``, :mod:`methods.stack_of_batch`) defines ``for_samples(n_samples)``, returning
    the resolved statistic, or None when the rule leaves nothing to collect, and says whether it
    still needs ``N`` with a ``depends_on_samples`` attribute. The engine calls this once the
    calibration is drawn, before it collects or loads anything, so keys and accumulators only ever
    see resolved options.

    Args:
        declared: What a method declares (``Method.statistics()``).
        n_samples: ``N``, the calibration samples (windows) of the run.

    Returns:
        The resolved statistics, in order, without those a rule dropped.
    """
    out: list[Statistic] = []
    for stat in declared:
        resolve = getattr(stat, "for_samples", None)
        resolved = resolve(n_samples) if callable(resolve) else stat
        if resolved is not None:
            out.append(resolved)
    return out


def union(declared: list[Statistic]) -> list[Statistic]:
    """Distinct statistics in first-declared order; two statistics may not produce the same name.

    Raises:
        ValueError: when two different statistics claim one result name.
    """
    out: dict[str, Statistic] = {}
    owner: dict[str, str] = {}
    for stat in declared:
        if stat.key in out:
            continue
        for name in stat.names:
            if name in owner:
                raise ValueError(f"statistics {owner[name]!r} and {stat.key!r} both produce {name!r}")
            owner[name] = stat.key
        out[stat.key] = stat
    return list(out.values())
