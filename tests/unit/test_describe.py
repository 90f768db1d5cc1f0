"""``svdbench methods NAME``: every option of every component documented, with its allowed values."""

from __future__ import annotations

import dataclasses
import json

import pytest

import methods  # noqa: F401  (registration)
from harness.cli import main
from methods.components import STAGES, build_component
from methods.describe import describe_method, option_descriptions
from methods.method import METHODS
from methods.registry import UnknownNameError


@pytest.mark.parametrize("stage,name", [(st, n) for st, reg in STAGES.items() for n in reg.names()])
def test_every_option_is_documented_and_its_choices_hold_its_default(stage, name):
    cls = STAGES[stage].get(name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    docs = option_descriptions(cls)
    undocumented = sorted(set(fields) - set(docs))
    assert not undocumented, f"{stage} {name}: options without a docstring entry: {undocumented}"
    for option, allowed in getattr(cls, "choices", {}).items():
        assert option in fields, f"{name}.choices names {option!r}, which is not an option"
        assert fields[option].default in allowed
        for value in allowed:  # every declared value is accepted, and only those
            build_component(stage, name, {option: value})
        with pytest.raises(ValueError, match=f"{name}.{option} must be one of"):
            build_component(stage, name, {option: "no-such-value"})


def test_description_spans_continuation_lines_and_stops_at_the_section_end():
    @dataclasses.dataclass(frozen=True)
    class Toy:
        """Toy.

        Options:
            alpha: First line
                continued here.
            beta: Short.

        Notes:
            gamma: not an option.
        """

        alpha: float = 1.0
        beta: int = 2

    assert option_descriptions(Toy) == {"alpha": "First line continued here.", "beta": "Short."}


def test_method_listing_names_each_component_option_default_and_preset():
    for name in METHODS.names():
        components = describe_method(name)
        assert [c.stage for c in components] == ["allocator", "factorizer", "refiner"]
    adasvd = {c.name: c for c in describe_method("adasvd")}
    sob = next(o for o in adasvd["adacomp"].options if o.name == "stack_of_batch")
    assert sob.default == 0 and "mini_bsz" in sob.description
    target = next(o for o in adasvd["adacomp"].options if o.name == "target")
    assert target.choices == ("same", "dense")
    with pytest.raises(UnknownNameError, match="adasvd"):
        describe_method("adasv")


def test_cli_prints_options_as_text_and_json(capsys):
    assert main(["methods", "asvd"]) == 0
    text = capsys.readouterr().out
    assert "asvd-sensitivity.monotone: bool = true; one of true, false" in text
    assert "asvd-scaling.alpha: float = 0.5" in text
    assert main(["methods", "fwsvd", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    axis = next(o for c in listing for o in c["options"] if o["name"] == "axis")
    assert axis["choices"] == ["rows", "inputs"] and axis["default"] == "rows"
