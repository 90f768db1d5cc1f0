from __future__ import annotations

import pytest

from methods import METHODS, UnknownNameError, parse_method, split_method_list


def test_unknown_method_names_closest_match():
    with pytest.raises(UnknownNameError, match=r"unknown method 'svd-lm'\. Did you mean 'svd-llm'"):
        parse_method("svd-lm")


def test_unknown_component_and_option_are_errors():
    with pytest.raises(ValueError, match="Did you mean 'whitened'"):
        parse_method("svd+whitend")
    with pytest.raises(ValueError, match="unknown option 'iters'"):
        parse_method("svd-llm[factorizer.iters=3]")


def test_compositions_and_swaps():
    assert parse_method("svd").config()["factorizer"]["name"] == "plain"
    m = parse_method("svd+whitened")
    assert m.config()["factorizer"]["name"] == "whitened" and m.name == "svd+whitened"
    assert {"svd", "svd-llm"} <= set(METHODS.names())


def test_method_list_split_respects_brackets():
    assert split_method_list("svd, svd-llm[a.b=1,c.d=2],x") == ["svd", "svd-llm[a.b=1,c.d=2]", "x"]
