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


def test_a_registered_composition_carries_stage_options_that_a_method_string_overrides(monkeypatch):
    from methods import register_method

    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))  # register into a throwaway copy
    register_method("fwsvd-inputs", "uniform", "fisher-weighted", options={"factorizer": {"axis": "inputs"}})
    assert parse_method("fwsvd-inputs").factorizer.axis == "inputs"
    assert parse_method("fwsvd-inputs[factorizer.axis=rows]").factorizer.axis == "rows"
    with pytest.raises(ValueError, match="unknown stage"):
        register_method("bad", "uniform", "plain", options={"factoriser": {}})


def test_out_of_tree_plugins_register_through_entry_points_once_and_a_broken_one_is_logged(monkeypatch, caplog):
    import methods.registry as registry
    from methods import register_method

    calls = []

    class EntryPoint:
        def __init__(self, name, plugin):
            self.name, self.plugin = name, plugin

        def load(self):
            return self.plugin

    def good():
        calls.append("good")
        register_method("plugin-svd", "uniform", "plain")

    def broken():
        raise RuntimeError("plugin bug")

    def entry_points(group):
        assert group == registry.ENTRY_POINT_GROUP
        return [EntryPoint("good", good), EntryPoint("broken", broken)]

    monkeypatch.setattr(METHODS, "_items", dict(METHODS._items))
    monkeypatch.setattr(registry.metadata, "entry_points", entry_points)
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    assert "plugin-svd" in METHODS and "plugin-svd" in METHODS.names()
    assert calls == ["good"] and "failed to load svdbench plugin broken" in caplog.text
