"""What a method is made of and which options it takes, read from the components themselves.

``svdbench methods NAME`` prints this. There is no second copy of the documentation: an option's
description is its entry in the component class's docstring (the ``Options:`` or ``Attributes:``
section, Google style), its default is the dataclass field's default (or the method's preset), its
type the field's annotation, and its allowed values the component's ``choices`` declaration, the
same one :func:`methods.components.check_choices` enforces. Descriptions carry the paper's reading
and ours where they differ (``paper: ...``, ``ours``), as the docstrings state them.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from dataclasses import dataclass
from typing import Any

from methods.components import STAGES
from methods.method import METHODS

_SECTION = re.compile(r"^(Options|Attributes):\s*$")
_ENTRY = re.compile(r"^(\s+)([A-Za-z_][A-Za-z0-9_]*):\s*(.*)$")


@dataclass(frozen=True)
class OptionInfo:
    """One option of a component.

    Attributes:
        name: The option (``stack_of_batch``); in a method string ``<component>.<name>=<value>``.
        type: The field's annotation as written (``int``, ``float | None``).
        default: The component's default.
        preset: The method's value where its registration overrides the default, else None.
        choices: Allowed values of a string option, or None (any value of ``type``).
        description: The docstring entry, continuation lines joined.
    """

    name: str
    type: str
    default: Any
    preset: Any
    choices: tuple[Any, ...] | None
    description: str

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ComponentInfo:
    """One component of a method: its stage, name, defining module, summary and options."""

    stage: str
    name: str
    module: str
    summary: str
    options: tuple[OptionInfo, ...]

    def to_json(self) -> dict[str, Any]:
        return {"stage": self.stage, "name": self.name, "module": self.module, "summary": self.summary,
                "options": [o.to_json() for o in self.options]}


def option_descriptions(cls: type) -> dict[str, str]:
    """``{option: description}`` from the ``Options:`` (or ``Attributes:``) section of ``cls``'s docstring.

    An entry is ``name: text`` at the section's indentation; more deeply indented lines continue it.
    """
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    in_section, indent, current = False, None, None
    for line in doc.splitlines():
        if _SECTION.match(line):
            in_section, indent, current = True, None, None
            continue
        if not in_section:
            continue
        if not line.strip():
            continue
        entry = _ENTRY.match(line)
        if entry and (indent is None or len(entry.group(1)) == indent):
            indent = len(entry.group(1))
            current = entry.group(2)
            out[current] = entry.group(3).strip()
        elif current is not None and indent is not None and len(line) - len(line.lstrip()) > indent:
            out[current] += " " + line.strip()
        else:  # dedent: the section ended
            in_section = False
    return out


def describe_component(stage: str, name: str, preset: dict[str, Any] | None = None) -> ComponentInfo:
    """The :class:`ComponentInfo` of component ``name`` of ``stage`` (``preset``: a method's options)."""
    cls = STAGES[stage].get(name)
    docs = option_descriptions(cls)
    choices = getattr(cls, "choices", {})
    preset = preset or {}
    options = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        options.append(OptionInfo(
            name=f.name, type=str(f.type), default=default, preset=preset.get(f.name),
            choices=tuple(choices[f.name]) if f.name in choices else (("true", "false") if f.type == "bool" else None),
            description=docs.get(f.name, ""),
        ))
    summary = (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")
    return ComponentInfo(stage=stage, name=name, module=cls.__module__, summary=summary, options=tuple(options))


def describe_method(name: str) -> list[ComponentInfo]:
    """The allocator, factorizer and refiner of registered method ``name``, with their options.

    Raises:
        UnknownNameError: for an unregistered name (with the closest registered ones).
    """
    parts = METHODS.get(name)
    return [describe_component(stage, comp, opts) for stage, (comp, opts) in parts.items()]


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "None" if value is None else str(value)


def format_method(name: str) -> str:
    """Plain-text listing of :func:`describe_method` for the terminal."""
    components = describe_method(name)
    lines = [f"{name} = " + " + ".join(f"{c.stage} {c.name}" for c in components), ""]
    for c in components:
        lines.append(f"{c.stage} {c.name} ({c.module})")
        if c.summary:
            lines.append(f"  {c.summary}")
        if not c.options:
            lines.append("  (no options)")
        for o in c.options:
            default = _value(o.default) + (f" (this method: {_value(o.preset)})" if o.preset is not None else "")
            allowed = f"; one of {', '.join(map(_value, o.choices))}" if o.choices else ""
            lines.append(f"  {c.name}.{o.name}: {o.type} = {default}{allowed}")
            if o.description:
                lines.append(f"      {o.description}")
        lines.append("")
    example = next((c for c in components if c.options), None)
    if example is not None:
        lines.append(f"Set an option in the method string: {name}[{example.name}.{example.options[0].name}=<value>] "
                     "(several: comma-separated inside the brackets).")
    return "\n".join(lines)
