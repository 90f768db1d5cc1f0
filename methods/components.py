"""The three plugin points of every method: allocator -> factorizer -> refiner (README.md, "Methods").

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
from typing import Any, ClassVar, Protocol, TypeVar

from torch import Tensor

from methods._linalg import Whitening, whitening
from methods.lowrank import Factorization
from methods.registry import Registry, did_you_mean

V = TypeVar("V")  # what AllocationContext.per_module scores each module with


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
        # Whitening cache, shared with every :meth:`derive`d copy (q/k/v keep one whitening).
        self._cache: dict[str, Any] = {}

    @classmethod
    def from_results(cls, results: dict[str, Tensor]) -> LinearStats:
        """From accumulator results (``tokens`` becomes the integer attribute)."""
        values = dict(results)
        tokens = values.pop("tokens", None)
        return cls(tokens=0 if tokens is None else int(tokens), **values)

    def get(self, name: str) -> Tensor | None:
        return self.values.get(name)

    def derive(self, extra: dict[str, Tensor]) -> LinearStats:
        """A copy with per-module results added (e.g. a weight's own gradient statistics) that shares
        this instance's tensors and whitening cache with the other linears of its input group."""
        out = LinearStats(tokens=self.tokens, **{**self.values, **extra})
        out._cache = self._cache
        return out

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
        return self.cached("whitening", lambda: whitening(self.gram))

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per input group (shared with :meth:`derive`d copies), e.g. a whitening
        variant that every linear reading this input reuses."""
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


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
        load_weight: ``f(module name) -> W: (m, n)`` float64 on the compute device, for allocators that
            score modules by their own factorization (e.g. a truncation loss at the target ratio).
        factorizer: The method's factorizer, for allocators and probes that measure the factorized
            model (so that a swapped-in factorizer is measured with its own factors).
    """

    modules: list[ModuleInfo]
    n_blocks: int
    block_cosine: list[float] | None = None
    stats: dict[str, LinearStats] | None = None
    probes: dict[str, Callable[..., Any]] = field(default_factory=dict)
    block_values: list[dict[str, float]] | None = None
    load_block: Callable[[int], dict[str, LinearStats]] | None = None
    load_weight: Callable[[str], Tensor] | None = None
    factorizer: Any = None

    def __post_init__(self) -> None:
        if self.block_cosine is None and self.block_values and "block_cosine" in self.block_values[0]:
            self.block_cosine = [b["block_cosine"] for b in self.block_values]

    def per_module(self, who: str, score: Callable[[ModuleInfo, Tensor, LinearStats], V]) -> dict[str, V]:
        """``score(module, W, stats)`` for every target linear, reading the statistics store one block at
        a time (host memory holds one block's statistics), ``W: (m, n)`` float64 on the compute device.

        Raises:
            RuntimeError: outside the harness (no store to read), naming the allocator ``who``.
        """
        if self.load_block is None or self.load_weight is None:
            raise RuntimeError(f"allocator {who!r} needs the stored statistics and weights; run it through the harness")
        out: dict[str, V] = {}
        for block in range(self.n_blocks):
            stats = self.load_block(block)
            for mod in (m for m in self.modules if m.block == block):
                out[mod.name] = score(mod, self.load_weight(mod.name), stats[mod.name])
        return out


class Allocator(Protocol):
    """Optional declarations (absent = none): ``statistics() -> tuple[Statistic, ...]``,
    ``probes: tuple[str, ...]`` (engine measurements it calls), ``uses_calibration: bool``
    (True when ``allocate`` reads statistics or probes, so they must be complete first) and
    ``requires_causal_lm: str`` (why it needs a next-token loss; any component or statistic may
    declare it, and a run on an encoder is then refused before the model loads)."""

    name: ClassVar[str]

    def allocate(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        """Keep ratio in (0, 1] per module name (1 = leave dense) for compression ``ratio``."""
        ...


class Factorizer(Protocol):
    """Optional declarations: ``statistics() -> tuple[Statistic, ...]`` beyond the dense Gram, and
    ``block_group: int`` with ``factorize_blocks`` (:class:`BlockGroupFactorizer`) for factors
    shared across consecutive blocks."""

    name: ClassVar[str]

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization:
        """Factors of ``W: (m, n)`` at ``rank`` (storage ``rank (m + n)``)."""
        ...


class BlockGroupFactorizer(Protocol):
    """A factorizer whose factors are shared by the modules of ``block_group`` consecutive blocks
    (blocks ``[j g, (j + 1) g)``, the last group possibly shorter). The engine hands it those blocks'
    modules together; the statistics of at most ``block_group`` blocks are held at once."""

    name: ClassVar[str]
    block_group: int

    def factorize_blocks(self, members: list[tuple[ModuleInfo, Tensor, LinearStats, float]]) -> dict[str, Factorization | None]:
        """Factors per module name (None = leave dense) from ``(module, W: (m, n), stats, keep)`` of
        every target linear of the group's blocks, in model order. Storage shared by several modules
        is counted once (:meth:`Factorization.param_count` of one of them)."""
        ...


class Refiner(Protocol):
    """Optional declaration: ``statistics() -> tuple[Statistic, ...]`` beyond the dense Gram."""

    name: ClassVar[str]

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


def check_choices(component: Any) -> None:
    """Refuse a string option outside its component's declared ``choices`` (``{option: allowed}``).

    Components call it from ``__post_init__``; the same declaration is what ``svdbench methods NAME``
    prints as the allowed values, so the check and the listing cannot drift apart.

    Raises:
        ValueError: naming the component, the option, the allowed values and the closest one.
    """
    for option, allowed in getattr(component, "choices", {}).items():
        value = getattr(component, option)
        if value not in allowed:
            raise ValueError(f"{component.name}.{option} must be one of {', '.join(map(str, allowed))}, "
                             f"got {value!r}.{did_you_mean(str(value), [str(a) for a in allowed])}")


def component_config(component: Any) -> dict[str, Any]:
    """JSON-able ``{"name": ..., **options}`` of a component (the record's method config).

    An option listed in the component's ``added_options`` (``{option: value}``) is left out while it
    holds that value: an option added after records were written, at the value those records used
    without naming it. Their configs, hence their run keys, stay what they were and they are not
    called stale; any other value (including a later default) enters the config, so a record can
    never stand for a reading it did not run (the rule :func:`harness.runs.config.key_fields` follows
    for fields added to the run key).
    """
    config = {"name": component.name, **dataclasses.asdict(component)}
    for option, implied in getattr(component, "added_options", {}).items():
        if option in config and config[option] == implied:
            del config[option]
    return config
