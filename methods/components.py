"""The three plugin points of every method: allocator -> factorizer -> refiner (DESIGN.md).

* An **allocator** turns the requested ratio into a keep ratio per target linear.
* A **factorizer** turns ``(W, statistics, rank)`` into factors.
* A **refiner** improves factors with calibration data.

Each component is a frozen dataclass (its fields are its options, JSON-able) with a ``name`` and the
one method of its protocol, registered in :data:`ALLOCATORS`, :data:`FACTORIZERS` or
:data:`REFINERS`. No base classes: the protocols below are structural.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import Tensor

from methods._linalg import Whitening, whitening
from methods.lowrank import Factorization
from methods.registry import Registry, did_you_mean


@dataclass(frozen=True)
class ModuleInfo:
    """One target linear of the model.

    Attributes:
        name: Full dotted module name (``model.layers.3.mlp.down_proj``).
        block: Index of its decoder block.
        kind: Its name inside the block (``mlp.down_proj``); groups modules by projection type.
        out_features: ``m``.
        in_features: ``n``.
    """

    name: str
    block: int
    kind: str
    out_features: int
    in_features: int

    @property
    def params(self) -> int:
        return self.out_features * self.in_features


@dataclass
class LinearStats:
    """Calibration statistics of one target linear (all float64, on CPU).

    Attributes:
        gram: ``H = sum_t x_t x_t^T: (n, n)`` over the dense model's inputs to this layer.
        tokens: Number of tokens summed into ``gram``.
        gram_hat: ``sum_t xh_t xh_t^T`` over inputs of the model whose earlier blocks are already
            compressed (only collected when a component asks for compressed inputs).
        cross: ``sum_t x_t xh_t^T: (n, n)``, dense by compressed inputs (same token pairs).
        gram_stacked: Stack-of-batch Gram ``sum_j xbar_j xbar_j^T`` over averaged groups of
            ``mini_bsz`` shuffled samples (token positions aligned), only when a component asks for
            it (``stack_of_batch`` option); ``gram_hat_stacked`` / ``cross_stacked`` are the same
            for the compressed stream and the dense-by-compressed pairs (paired pass only).
    """

    gram: Tensor
    tokens: int
    gram_hat: Tensor | None = None
    cross: Tensor | None = None
    gram_stacked: Tensor | None = None
    gram_hat_stacked: Tensor | None = None
    cross_stacked: Tensor | None = None
    _white: Whitening | None = field(default=None, repr=False)

    def whitening(self) -> Whitening:
        """Whitening of ``gram``, computed once and shared by every ratio and method."""
        if self._white is None:
            self._white = whitening(self.gram)
        return self._white


@dataclass
class AllocationContext:
    """What an allocator may look at.

    Attributes:
        modules: Every target linear, in model order.
        n_blocks: Number of decoder blocks.
        block_cosine: Mean over calibration tokens of cos(block input, block output), per block
            (from the dense statistics pass).
        stats: Per-module statistics (name -> LinearStats), for allocators that need spectra.
        probes: Engine-backed measurements by name (e.g. a KL deviation of the perturbed model),
            for allocators that must run the model.
    """

    modules: list[ModuleInfo]
    n_blocks: int
    block_cosine: list[float] | None = None
    stats: dict[str, LinearStats] | None = None
    probes: dict[str, Callable[..., Any]] = field(default_factory=dict)


class Allocator(Protocol):
    name: ClassVar[str]

    def allocate(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        """Keep ratio in (0, 1] per module name (1 = leave dense) for compression ``ratio``."""
        ...


class Factorizer(Protocol):
    name: ClassVar[str]

    @property
    def needs_compressed_inputs(self) -> bool: ...

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization:
        """Factors of ``W: (m, n)`` at ``rank`` (storage ``rank (m + n)``)."""
        ...


class Refiner(Protocol):
    name: ClassVar[str]

    @property
    def needs_compressed_inputs(self) -> bool: ...

    def refine(self, weight: Tensor, fact: Factorization, stats: LinearStats) -> Factorization:
        """Better factors of ``W`` at the same storage."""
        ...


ALLOCATORS: Registry[type] = Registry("allocator")
FACTORIZERS: Registry[type] = Registry("factorizer")
REFINERS: Registry[type] = Registry("refiner")
STAGES: dict[str, Registry[type]] = {"allocator": ALLOCATORS, "factorizer": FACTORIZERS, "refiner": REFINERS}


def register(stage: str) -> Callable[[type], type]:
    """Class decorator: register a component dataclass under its ``name`` in ``stage``."""

    def add(cls: type) -> type:
        STAGES[stage].register(cls.name, cls)
        return cls

    return add


def build_component(stage: str, name: str, options: dict[str, Any] | None = None) -> Any:
    """Instantiate component ``name`` of ``stage`` with ``options``; unknown options are errors."""
    cls = STAGES[stage].get(name)
    options = dict(options or {})
    known = [f.name for f in dataclasses.fields(cls)]
    for key in options:
        if key not in known:
            raise ValueError(
                f"unknown option {key!r} for {stage} {name!r}.{did_you_mean(key, known)} "
                f"Options: {', '.join(known) or '(none)'}"
            )
    try:
        return cls(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad options for {stage} {name!r}: {exc}") from exc


def component_config(component: Any) -> dict[str, Any]:
    """JSON-able ``{"name": ..., **options}`` of a component (the record's method config)."""
    return {"name": component.name, **dataclasses.asdict(component)}
