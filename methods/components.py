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


class LinearStats:
    """Calibration statistics of one target linear: the named results of the declared statistics.

    Linears that read the same input tensor (q/k/v, gate/up) share one instance, so whitening is
    computed once for all of them. Every tensor lives on the compute device, float64.

    Attributes:
        values: Result name -> tensor (see :mod:`methods.statistics`).
        tokens: Number of tokens summed into ``gram``.
    """

    def __init__(self, gram: Tensor | None = None, tokens: int = 0, gram_hat: Tensor | None = None,
                 cross: Tensor | None = None, **values: Tensor | None) -> None:
        named = {"gram": gram, "gram_hat": gram_hat, "cross": cross, **values}
        self.values: dict[str, Tensor] = {k: v for k, v in named.items() if v is not None}
        self.tokens = int(tokens)
        self._white: Whitening | None = None

    @classmethod
    def from_results(cls, results: dict[str, Tensor]) -> LinearStats:
        """From accumulator results (``tokens`` becomes the integer attribute)."""
        values = dict(results)
        tokens = values.pop("tokens", None)
        return cls(tokens=0 if tokens is None else int(tokens), **values)

    def get(self, name: str) -> Tensor | None:
        return self.values.get(name)

    @property
    def gram(self) -> Tensor:
        """``H = sum_t x_t x_t^T: (n, n)`` over the dense model's inputs to this layer."""
        return self.values["gram"]

    def _set(self, name: str, value: Tensor | None) -> None:
        if value is None:
            self.values.pop(name, None)
        else:
            self.values[name] = value

    gram_hat = property(lambda self: self.values.get("gram_hat"), lambda self, v: self._set("gram_hat", v),
                        doc="``sum_t xh_t xh_t^T``: inputs of the model whose earlier blocks are compressed.")
    cross = property(lambda self: self.values.get("cross"), lambda self, v: self._set("cross", v),
                     doc="``sum_t x_t xh_t^T: (n, n)``, dense by compressed inputs (same token pairs).")
    gram_stacked = property(lambda self: self.values.get("gram_stacked"), lambda self, v: self._set("gram_stacked", v),
                            doc="Stack-of-batch Gram ``sum_j xbar_j xbar_j^T`` (:mod:`methods.stack_of_batch`).")
    gram_hat_stacked = property(lambda self: self.values.get("gram_hat_stacked"),
                                lambda self, v: self._set("gram_hat_stacked", v))
    cross_stacked = property(lambda self: self.values.get("cross_stacked"), lambda self, v: self._set("cross_stacked", v))

    def whitening(self) -> Whitening:
        """Whitening of ``gram``, computed once and shared by every ratio, method and sharing linear."""
        if self._white is None:
            self._white = whitening(self.gram)
        return self._white


@dataclass
class AllocationContext:
    """What an allocator may look at.

    Attributes:
        modules: Every target linear, in model order.
        n_blocks: Number of decoder blocks.
        block_cosine: Per block, mean over calibration tokens of cos(block input, block output);
            filled from ``block_values`` when the allocator declares :class:`BlockCosine`.
        stats: Per-module statistics (name -> LinearStats), when they fit in memory (tests).
        probes: Engine-backed measurements by name (e.g. a KL deviation of the perturbed model),
            for allocators that must run the model.
        block_values: Per block, the scalar results of the block-scope statistics the method declared.
        load_block: ``f(block) -> {module name: LinearStats}``: one block's statistics, read from the
            engine's store (host memory stays bounded by one block).
    """

    modules: list[ModuleInfo]
    n_blocks: int
    block_cosine: list[float] | None = None
    stats: dict[str, LinearStats] | None = None
    probes: dict[str, Callable[..., Any]] = field(default_factory=dict)
    block_values: list[dict[str, float]] | None = None
    load_block: Callable[[int], dict[str, LinearStats]] | None = None

    def __post_init__(self) -> None:
        if self.block_cosine is None and self.block_values and "block_cosine" in self.block_values[0]:
            self.block_cosine = [b["block_cosine"] for b in self.block_values]


class Allocator(Protocol):
    """Optional declarations (absent = none): ``statistics() -> tuple[Statistic, ...]``,
    ``probes: tuple[str, ...]`` (engine measurements it calls) and ``uses_calibration: bool``
    (True when ``allocate`` reads statistics or probes, so they must be complete first)."""

    name: ClassVar[str]

    def allocate(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        """Keep ratio in (0, 1] per module name (1 = leave dense) for compression ``ratio``."""
        ...


class Factorizer(Protocol):
    """Optional declaration: ``statistics() -> tuple[Statistic, ...]`` beyond the dense Gram."""

    name: ClassVar[str]

    @property
    def needs_compressed_inputs(self) -> bool: ...

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization:
        """Factors of ``W: (m, n)`` at ``rank`` (storage ``rank (m + n)``)."""
        ...


class Refiner(Protocol):
    """Optional declaration: ``statistics() -> tuple[Statistic, ...]`` beyond the dense Gram."""

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
