"""Replacement module types: one registry of the ``nn.Module`` classes factorizers swap in for ``nn.Linear``.

A factorizer whose ``to_module`` returns a module of its own type registers that type here, next to
the class (``@register_module_type``), and the class declares what the harness needs of it:

* ``export_name: ClassVar[str]``: the ``class`` recorded in an export's module specs (and in the
  compression store). It is written into every export, so it outlives renames of the Python class.
* ``forward_path: ClassVar[str]``: the efficiency evaluation's label of its forward (``two-matmul``,
  ...); a model with any registered module among its target linears is measured as compressed.
* ``export_spec(self) -> dict``: the JSON-able shape facts that rebuild it, at least
  ``in_features``, ``out_features``, ``rank`` and ``bias`` (the registry puts ``class`` first).
* ``from_spec(cls, spec, device, dtype) -> nn.Module`` (classmethod): an uninitialised module of that
  shape (``device="meta"`` allocates nothing) whose ``state_dict`` keys and shapes are the ones an
  export stores for it; loading fills them.

Accounting is by construction, not by declaration: what a module stores is its ``state_dict``
(persistent buffers included, e.g. index sets), what it counts is its parameters, and a tensor shared
by several modules (a shared basis) is one ``nn.Parameter`` object held by each of them, so exports,
``count_params`` and the efficiency byte counts store and count it once.

The harness (export, load, compression store, ``svdbench validate``, efficiency) asks this registry
and names no class. The modeling file copied into exports for plain ``transformers``
(``harness/remote_code/modeling_svdbench.py``) is self-contained and knows the built-in types only:
an export holding another type loads with svdbench's loader.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, ClassVar, Protocol, TypeVar, runtime_checkable

import torch
from torch import nn

DENSE_PATH = "dense"  # efficiency's label for a target linear left as nn.Linear


@runtime_checkable
class ReplacementModule(Protocol):
    """What a registered module type declares (module docstring)."""

    export_name: ClassVar[str]
    forward_path: ClassVar[str]
    in_features: int
    out_features: int

    def export_spec(self) -> dict[str, Any]:
        """Shape facts that rebuild this module through :meth:`from_spec` (JSON-able)."""
        ...

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> nn.Module:
        """An uninitialised module of the shape ``spec`` records."""
        ...


M = TypeVar("M", bound=type)


class ModuleTypeRegistry:
    """``export_name`` -> module class; lookups of a module go by its exact class (a subclass that is
    not registered itself is not a replacement module: its forward or state may differ)."""

    def __init__(self) -> None:
        self._by_name: dict[str, type[nn.Module]] = {}
        self._classes: set[type] = set()

    def register(self, cls: M) -> M:
        """Register ``cls`` (a class decorator); the declarations are checked here, not at first export.

        Raises:
            TypeError: when ``cls`` is not an ``nn.Module`` or lacks a declaration.
            ValueError: when its ``export_name`` is taken or its ``forward_path`` is ``dense``.
        """
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise TypeError(f"a replacement module type must be an nn.Module class, got {cls!r}")
        name, path = getattr(cls, "export_name", None), getattr(cls, "forward_path", None)
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise TypeError(f"{cls.__name__} must declare export_name and forward_path as non-empty strings")
        for method in ("export_spec", "from_spec"):
            if not callable(getattr(cls, method, None)):
                raise TypeError(f"{cls.__name__} must define {method} (see methods/module_types.py)")
        if path == DENSE_PATH:
            # "dense" is what classifies a model as uncompressed; a replacement claiming it would be measured as dense.
            raise ValueError(f"{cls.__name__}: forward_path {DENSE_PATH!r} is reserved for nn.Linear")
        if name in self._by_name:
            raise ValueError(f"module type {name!r} is already registered (by {self._by_name[name].__qualname__})")
        self._by_name[name] = cls
        self._classes.add(cls)
        return cls

    def unregister(self, name: str) -> None:
        """Remove the type registered as ``name`` (tests that register a toy type clean up with this)."""
        cls = self._by_name.pop(name)
        self._classes.discard(cls)

    def names(self) -> list[str]:
        """Registered export names, in registration order."""
        return list(self._by_name)

    def __iter__(self) -> Iterator[type[nn.Module]]:
        return iter(list(self._by_name.values()))

    def get(self, name: str) -> type[nn.Module]:
        """The class registered as ``name``.

        Raises:
            KeyError: naming the registered types.
        """
        if name not in self._by_name:
            raise KeyError(f"unknown module class {name!r} (this svdbench knows {', '.join(self._by_name)})")
        return self._by_name[name]

    def of(self, module: nn.Module) -> type[nn.Module] | None:
        """The registered type of ``module``, or None for any other module (``nn.Linear`` included)."""
        cls = type(module)
        return cls if cls in self._classes else None

    def spec(self, module: nn.Module) -> dict[str, Any]:
        """``{"class": export_name, **module.export_spec()}``: the export's record of one module.

        Raises:
            KeyError: when ``module`` is not of a registered type.
        """
        cls = self.of(module)
        if cls is None:
            raise KeyError(f"{type(module).__qualname__} is not a registered replacement module type")
        return {"class": cls.export_name, **module.export_spec()}  # type: ignore[attr-defined]

    def build(self, spec: Mapping[str, Any], device: torch.device | str | None = None,
              dtype: torch.dtype | None = None) -> nn.Module:
        """An uninitialised module of the type and shape ``spec`` records (see :meth:`spec`).

        Raises:
            KeyError: for an unknown ``class`` or a missing field; TypeError / ValueError: for a bad field.
        """
        return self.get(str(spec.get("class"))).from_spec(spec, device, dtype)  # type: ignore[attr-defined]

    def replacements(self, model: nn.Module) -> dict[str, nn.Module]:
        """``{dotted name: module}`` of the registered modules in ``model``, in model order.

        A registered module inside another (the low-rank part of a column-preserving layer) belongs
        to the outer one's spec and state, so only the outermost ones are listed.
        """
        found: dict[str, nn.Module] = {}
        for name, mod in model.named_modules():
            if self.of(mod) is not None and not any(name.startswith(f"{outer}.") for outer in found):
                found[name] = mod
        return found

    def linear_like(self, module: nn.Module) -> bool:
        """Whether ``module`` is a target linear: an ``nn.Linear`` or a registered replacement for one."""
        return isinstance(module, nn.Linear) or self.of(module) is not None

    def forward_path(self, module: nn.Module) -> str:
        """Efficiency's label of the forward ``module`` runs: its type's ``forward_path``, else ``dense``."""
        cls = self.of(module)
        return DENSE_PATH if cls is None else cls.forward_path  # type: ignore[attr-defined]


# The built-in types register when their files are imported. Importing this module imports the
# ``methods`` package first, whose ``__init__`` imports every method (hence every module file), so
# any lookup from the harness already sees them.
MODULE_TYPES = ModuleTypeRegistry()
register_module_type = MODULE_TYPES.register
