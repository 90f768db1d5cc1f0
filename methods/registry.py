"""One typed registry implementation with did-you-mean errors and entry-point discovery.

Used for allocators, factorizers, refiners and named methods here, and by the engine for model
adapters and evaluation protocols. Out-of-tree plugins register through the ``svdbench.methods``
entry-point group: each entry point is a callable that receives nothing and registers what it
brings (it is called once, at the first lookup).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
ENTRY_POINT_GROUP = "svdbench.methods"


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message names the closest matches."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def did_you_mean(name: str, choices: list[str]) -> str:
    """``" Did you mean 'x'?"`` for the closest of ``choices``, or an empty string."""
    close = difflib.get_close_matches(name, choices, n=2, cutoff=0.5)
    if not close:
        return ""
    return " Did you mean " + " or ".join(repr(c) for c in close) + "?"


class Registry(Generic[T]):
    """Name -> object map; duplicate names are errors, unknown names suggest close matches."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T | None = None) -> Callable[[T], T] | T:
        """Register ``obj`` under ``name``; without ``obj`` returns a decorator."""

        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = item
            return item

        return add if obj is None else add(obj)

    def get(self, name: str) -> T:
        """Look ``name`` up.

        Raises:
            UnknownNameError: with the known names and the closest match.
        """
        _load_plugins()
        if name not in self._items:
            known = sorted(self._items)
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}.{did_you_mean(name, known)} Known: {', '.join(known)}"
            )
        return self._items[name]

    def __contains__(self, name: object) -> bool:
        _load_plugins()
        return name in self._items

    def names(self) -> list[str]:
        _load_plugins()
        return list(self._items)

    def items(self) -> Iterator[tuple[str, T]]:
        _load_plugins()
        return iter(list(self._items.items()))


_plugins_loaded = False


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()()
        except Exception:  # a broken third-party plugin must not take the registry down
            log.exception("failed to load svdbench plugin %s", ep.name)
