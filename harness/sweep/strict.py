"""Strict conversion of raw YAML values into frozen dataclasses, with key paths in every error.

Unknown keys, missing required keys and values of the wrong type are errors whose message names
the path (``sweep.grid.ratios[2]``) and, for a misspelt name, the closest valid one. A field can
bring its own parser through ``field(metadata={"parse": fn})`` with ``fn(value, path)``.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["SpecError", "build", "convert", "expand_env", "expect_list", "parse_with", "unique", "unknown"]

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class SpecError(ValueError):
    """An invalid sweep spec or override; the message names the key path."""


def _close(name: str, choices: Sequence[str]) -> str | None:
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def unknown(kind: str, name: str, path: str, choices: Sequence[str]) -> SpecError:
    """``unknown key 'ratioz' at sweep.grid; did you mean 'ratios'?`` (or the list of known names)."""
    guess = _close(name, choices)
    hint = f"did you mean {guess!r}?" if guess else f"known {kind}s: {', '.join(sorted(choices))}"
    return SpecError(f"unknown {kind} {name!r} at {path}; {hint}")


def unique(items: list[Any], path: str, label: Callable[[Any], str]) -> tuple[Any, ...]:
    """``items`` as a tuple; two with the same ``label`` are an error naming the second one's path."""
    seen: set[str] = set()
    for i, item in enumerate(items):
        if label(item) in seen:
            raise SpecError(f"duplicate entry {label(item)!r} at {path}[{i}]")
        seen.add(label(item))
    return tuple(items)


def parse_with(fn: Callable[[Any, str], Any]) -> dict[str, Any]:
    """Field metadata that makes :func:`build` parse the field with ``fn(value, path)``."""
    return {"parse": fn}


def expect_list(value: Any, path: str) -> list[Any]:
    """``value`` if it is a list (YAML sequence), else an error naming ``path``."""
    if not isinstance(value, list):
        raise SpecError(f"expected a list at {path}, got {value!r}")
    return value


def convert(value: Any, tp: Any, path: str) -> Any:
    """``value`` checked against the annotation ``tp`` (str, int, float, bool, X | None, tuple[X, ...],
    dataclass); ints are accepted for floats, nothing else is coerced."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return convert(value, inner, path)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin is tuple:
        return tuple(convert(v, args[0], f"{path}[{i}]") for i, v in enumerate(expect_list(value, path)))
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise SpecError(f"expected {tp.__name__} at {path}, got {value!r}")
    return float(value) if tp is float else value


def build(cls: type, raw: Any, path: str) -> Any:
    """Instantiate dataclass ``cls`` from the mapping ``raw``; unknown or missing keys are errors."""
    if not isinstance(raw, Mapping):
        raise SpecError(f"expected a mapping at {path}, got {raw!r}")
    fields = dataclasses.fields(cls)
    names = [f.name for f in fields]
    for key in raw:
        if key not in names:
            raise unknown("key", str(key), path, names)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields:
        where = f"{path}.{f.name}"
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(f"missing key {f.name!r} at {path}")
            continue
        parse = f.metadata.get("parse")
        kwargs[f.name] = parse(raw[f.name], where) if parse else convert(raw[f.name], hints[f.name], where)
    return cls(**kwargs)


def expand_env(value: Any, path: str) -> Any:
    """Replace ``${NAME}`` in every string with the environment variable ``NAME``."""
    if isinstance(value, str):
        def sub(m: re.Match[str]) -> str:
            if m[1] not in os.environ:
                raise SpecError(f"environment variable {m[1]} is not set (used at {path})")
            return os.environ[m[1]]

        return _ENV_RE.sub(sub, value)
    if isinstance(value, Mapping):
        return {k: expand_env(v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return value
