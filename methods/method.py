"""Named methods as compositions of allocator + factorizer + refiner, and the method grammar.

A method string is ``BASE[+COMPONENT...][opt=value,...]``:

* ``svd-llm``: a registered composition.
* ``svd-llm+adacomp``: swap in the component ``adacomp`` at its stage (component names are unique
  across stages), so ablations need no new code; ``adasvd+uniform`` switches adaCR off,
  ``adasvd+none`` switches the refiner off.
* ``svd-llm+adacomp[adacomp.iters=10,adacomp.inputs=original]``: component options
  (``stage.option=value`` or ``component_name.option=value``).

The canonical string is the method's name in records, and the resolved config holds every option.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from methods._linalg import lowrank_params, rank_from_keep
from methods.components import (
    STAGES,
    AllocationContext,
    Allocator,
    Factorizer,
    LinearStats,
    Refiner,
    build_component,
    component_config,
    register,
)
from methods.lowrank import Factorization
from methods.registry import Registry, did_you_mean
from methods.statistics import InputGram, Statistic, union


@register("allocator")
@dataclass(frozen=True)
class UniformAllocator:
    """Every target linear keeps ``1 - ratio`` of its parameters (SVD, SVD-LLM)."""

    name: ClassVar[str] = "uniform"

    def allocate(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        return {m.name: 1.0 - ratio for m in ctx.modules}


@register("refiner")
@dataclass(frozen=True)
class NoRefiner:
    """Leaves the factors as the factorizer made them."""

    name: ClassVar[str] = "none"

    def refine(self, weight: Tensor, fact: Factorization, stats: LinearStats) -> Factorization:
        return fact


# name -> {stage: (component name, options)}
METHODS: Registry[dict[str, tuple[str, dict[str, Any]]]] = Registry("method")


def register_method(name: str, allocator: str, factorizer: str, refiner: str = "none", *,
                    options: Mapping[str, Mapping[str, Any]] | None = None) -> None:
    """Register a named composition of three registered components.

    Args:
        name: The method's name in method strings (``svd-llm``).
        allocator, factorizer, refiner: Component names.
        options: Per-stage option defaults of this composition, ``{"factorizer": {"axis": "inputs"}}``;
            a method string's own ``stage.option=value`` still overrides them.

    Raises:
        ValueError: an options key that is not a stage, or a name already registered.
    """
    unknown = sorted(set(options or {}) - set(STAGES))
    if unknown:
        raise ValueError(f"method {name!r}: options for unknown stage(s) {unknown}; stages: {', '.join(STAGES)}")
    parts = {"allocator": allocator, "factorizer": factorizer, "refiner": refiner}
    METHODS.register(name, {st: (comp, dict((options or {}).get(st, {}))) for st, comp in parts.items()})


register_method("svd", "uniform", "plain")
register_method("svd-llm", "uniform", "whitened")


def _declared_statistics(component: Any) -> tuple[Statistic, ...]:
    """A component's declared statistics (``statistics()``; absent = none beyond the dense Gram)."""
    declare = getattr(component, "statistics", None)
    return tuple(declare()) if callable(declare) else ()


@dataclass(frozen=True)
class Method:
    """A resolved method: its canonical name and the three built components."""

    name: str
    allocator: Allocator
    factorizer: Factorizer
    refiner: Refiner

    def __post_init__(self) -> None:
        if self.block_group > 1:
            # Shared factors are fitted for the group at once: a per-module refit would unshare them,
            # and the compressed stream cannot pass a block whose group is not compressed yet.
            if not isinstance(self.refiner, NoRefiner):
                raise ValueError(f"factorizer {self.factorizer.name!r} shares factors across blocks; "
                                 f"refiner {self.refiner.name!r} would refit them module by module")
            if self.needs_compressed_inputs:
                raise ValueError(f"factorizer {self.factorizer.name!r} shares factors across blocks and cannot "
                                 "be combined with statistics of the compressed model's inputs")

    @property
    def components(self) -> tuple[Any, Any, Any]:
        return self.allocator, self.factorizer, self.refiner

    @property
    def block_group(self) -> int:
        """Consecutive blocks whose modules the factorizer handles together (1 = each module alone)."""
        return int(getattr(self.factorizer, "block_group", 1) or 1)

    def causal_lm_reasons(self) -> list[str]:
        """Why this method needs a causal LM (a next-token loss), one line per component or statistic
        that declares ``requires_causal_lm``; empty when it runs on any model."""
        out = []
        for stage, comp in zip(("allocator", "factorizer", "refiner"), self.components, strict=True):
            if why := getattr(comp, "requires_causal_lm", ""):
                out.append(f"{stage} {comp.name!r}: {why}")
        for stat in self.statistics():
            if why := getattr(stat, "requires_causal_lm", ""):
                out.append(f"statistic {stat.key!r}: {why}")
        return list(dict.fromkeys(out))

    def statistics(self) -> list[Statistic]:
        """The statistics the engine collects for this method: the dense Gram (every record reports
        each layer's calibration error from it) and the union of what the components declare."""
        declared: list[Statistic] = [InputGram()]
        for comp in self.components:
            declared.extend(_declared_statistics(comp))
        return union(declared)

    @property
    def probes(self) -> tuple[str, ...]:
        """Engine measurements the allocator calls (built only when declared)."""
        return tuple(getattr(self.allocator, "probes", ()))

    @property
    def allocation_uses_calibration(self) -> bool:
        """True when the allocator reads statistics or probes: they must be complete before it runs."""
        return bool(getattr(self.allocator, "uses_calibration", False))

    @property
    def needs_compressed_inputs(self) -> bool:
        """True when a declared statistic pairs dense inputs with the compressed model's inputs."""
        return any(stat.stream == "paired" for stat in self.statistics())

    def config(self) -> dict[str, Any]:
        return {
            "allocator": component_config(self.allocator),
            "factorizer": component_config(self.factorizer),
            "refiner": component_config(self.refiner),
        }


_METHOD_RE = re.compile(r"^(?P<base>[A-Za-z0-9_.\-]+?)(?P<swaps>(\+[A-Za-z0-9_\-]+)*)(\[(?P<opts>.*)\])?$")


def _stage_of(component: str) -> str:
    stages = [st for st, reg in STAGES.items() if component in reg]
    if not stages:
        known = sorted({n for reg in STAGES.values() for n in reg.names()})
        raise ValueError(f"unknown component {component!r}.{did_you_mean(component, known)} Known: {', '.join(known)}")
    return stages[0]


def _parse_value(text: str) -> Any:
    """JSON values (``0.5``, ``true``, ``null``), Python's ``None``, else the bare string."""
    if text == "None":
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings such as inputs=compressed


def parse_method(spec: str) -> Method:
    """Resolve a method string (module docstring) into a :class:`Method`.

    Raises:
        ValueError / UnknownNameError: for an unknown method, component or option, with the closest
            registered name.
    """
    text = spec.strip()
    match = _METHOD_RE.match(text)
    if not match:
        raise ValueError(f"cannot parse method {spec!r}; expected BASE[+COMPONENT...][stage.option=value,...]")
    parts = {st: (c, dict(o)) for st, (c, o) in METHODS.get(match["base"]).items()}
    for comp in filter(None, (match["swaps"] or "").split("+")):
        parts[_stage_of(comp)] = (comp, {})
    for item in filter(None, (s.strip() for s in (match["opts"] or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or "." not in key:
            raise ValueError(f"method option {item!r} must look like stage.option=value")
        where, opt = key.split(".", 1)
        stage = where if where in STAGES else next((st for st, (c, _) in parts.items() if c == where), None)
        if stage is None:
            raise ValueError(f"option {item!r} names neither a stage nor a component of {spec!r}")
        parts[stage][1][opt] = _parse_value(value)
    built = {st: build_component(st, comp, opts) for st, (comp, opts) in parts.items()}
    return Method(canonical_name(text), built["allocator"], built["factorizer"], built["refiner"])


def canonical_name(spec: str) -> str:
    """The method string without white space (the name stored in records)."""
    return re.sub(r"\s+", "", spec)


def split_method_list(text: str) -> list[str]:
    """Split ``"svd,svd-llm+adacomp[adacomp.iters=5,adacomp.init=plain]"`` at top-level commas."""
    out, depth, cur = [], 0, ""
    for ch in text:
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [s.strip() for s in out if s.strip()]


def rank_for(out_features: int, in_features: int, keep: float) -> int | None:
    """Rank at ``keep``, or None when factoring would not save storage (the module stays dense).

    ``keep >= 1`` always means dense: for a non-square matrix ``floor(m n / (m + n))`` can still
    save a few parameters, and factoring it would silently change a module the allocator left alone.
    """
    if keep >= 1.0:
        return None
    k = rank_from_keep(out_features, in_features, keep)
    if lowrank_params(out_features, in_features, k) >= out_features * in_features:
        return None
    return k
