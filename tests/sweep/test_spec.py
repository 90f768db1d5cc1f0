"""Sweep spec parsing: strict keys with key paths, ratio and method checks, overrides, ${ENV}."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

from harness.sweep.spec import SpecError, apply_overrides, load_spec, parse_spec
from methods import METHODS

ROOT = Path(__file__).resolve().parents[2]


def raw(**sweep: object) -> dict:
    base = {"name": "t", "grid": {"models": ["m"], "methods": ["svd"], "ratios": [0.4]}}
    for key, value in sweep.items():
        if key in ("models", "methods", "ratios", "seeds"):
            base["grid"][key] = value
        else:
            base[key] = value
    return {"sweep": base}


def error(spec: dict, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(spec, overrides)
    return str(info.value)


def test_minimal_spec_defaults():
    spec = parse_spec(raw())
    assert spec.grid.models[0].id == "m" and spec.grid.methods == ("svd",) and spec.grid.ratios == (0.4,)
    assert spec.grid.seeds == (0,) and spec.evals == ("wikitext2",) and spec.executor == "inprocess"
    assert spec.calibration.samples == 256 and spec.eval.batch_size == 8 and spec.n_cells == 1


def test_unknown_key_names_its_path_and_the_closest_key():
    spec = raw()
    spec["sweep"]["grid"]["ratioz"] = [0.2]
    assert error(spec) == "unknown key 'ratioz' at sweep.grid; did you mean 'ratios'?"
    spec = raw(calibration={"sampels": 8})
    assert error(spec) == "unknown key 'sampels' at sweep.calibration; did you mean 'samples'?"
    assert error({"swep": {}}) == "unknown key 'swep' at top level; did you mean 'sweep'?"
    assert error({"sweep": raw()["sweep"], "extra": 1}) == "unknown key 'extra' at top level; known keys: sweep"
    assert error({}) == "missing key 'sweep' at top level"
    assert error(raw(eval={"xyz": 1})) == (
        "unknown key 'xyz' at sweep.eval; known keys: batch_size, limit, max_windows, offload, options, seqlen, tasks, window_stride"
    )


def test_missing_and_mistyped_values():
    spec = raw()
    del spec["sweep"]["grid"]["ratios"]
    assert error(spec) == "missing key 'ratios' at sweep.grid"
    assert error(raw(calibration={"samples": "many"})) == "expected int at sweep.calibration.samples, got 'many'"
    assert error(raw(calibration={"samples": 0})) == "bad value 0 at sweep.calibration.samples: must be a positive integer"
    assert error(raw(ratios=0.4)) == "expected a list at sweep.grid.ratios, got 0.4"
    assert error(raw(models=[{"id": "a", "testbed": "b"}])) == (
        "model at sweep.grid.models[0] needs exactly one of 'id' or 'testbed'"
    )
    assert error(raw(evals=["wikitext3"])) == "unknown evaluation 'wikitext3' at sweep.evals[0]; did you mean 'wikitext2'?"
    assert error(raw(dtype="fp8")) == "unknown value 'fp8' at sweep.dtype; known values: auto, bfloat16, float16, float32"


def test_submitit_section():
    spec = parse_spec(raw(submitit={"cluster": "slurm", "unit": "group", "gpus_per_node": 0,
                                    "sbatch": {"account": "proj", "nice": 10, "exclusive": True, "hold": False}}))
    s = spec.submitit
    assert (s.cluster, s.unit, s.gpus_per_node) == ("slurm", "group", 0)
    assert s.sbatch == (("account", "proj"), ("nice", "10"), ("exclusive", True))
    assert parse_spec(raw()).submitit.unit == "cell" and parse_spec(raw()).submitit.cluster is None
    assert error(raw(submitit={"unit": "cells"})) == "unknown value 'cells' at sweep.submitit.unit; did you mean 'cell'?"
    assert error(raw(submitit={"cluster": "slrum"})) == (
        "unknown value 'slrum' at sweep.submitit.cluster; did you mean 'slurm'?"
    )
    assert error(raw(submitit={"sbatch": {"gres": ["gpu:1"]}})) == (
        "expected a string, number or true at sweep.submitit.sbatch.gres, got ['gpu:1']"
    )


def test_bad_ratio_messages():
    assert error(raw(ratios=[0.2, 1.5])) == (
        "bad ratio 1.5 at sweep.grid.ratios[1]: must lie in (0, 1) (the fraction of parameters removed)"
    )
    assert error(raw(ratios=[0])) == (
        "bad ratio 0.0 at sweep.grid.ratios[0]: must lie in (0, 1) (the fraction of parameters removed)"
    )
    assert error(raw(ratios=[0.4, 0.4])) == "duplicate entry '0.4' at sweep.grid.ratios[1]"


def test_unknown_method_suggests_from_the_registry():
    assert error(raw(methods=["svd", "svd-lmm"])) == "unknown method 'svd-lmm' at sweep.grid.methods[1]; did you mean 'svd-llm'?"
    message = error(raw(methods=["zzzz"]))
    assert message == f"unknown method 'zzzz' at sweep.grid.methods[0]; known methods: {', '.join(sorted(METHODS.names()))}"


def test_method_mapping_with_options_goes_through_the_method_grammar():
    from harness.sweep.spec import _method_string

    entry = {"name": "svd-llm+adacomp", "options": {"adacomp.iters": 5, "adacomp.inputs": "original"}}
    assert _method_string(entry, "p") == "svd-llm+adacomp[adacomp.iters=5,adacomp.inputs=original]"
    assert parse_spec(raw(methods=[{"name": "svd-llm"}, " svd "])).grid.methods == ("svd-llm", "svd")
    assert error(raw(methods=[{"name": "svd", "options": {"factorizer.iters": 5}}])) == (
        "invalid method 'svd[factorizer.iters=5]' at sweep.grid.methods[0]: "
        "unknown option 'iters' for factorizer 'plain'. Options: (none)"
    )
    assert error(raw(methods=[{"name": "svd", "opts": {}}])) == (
        "unknown key 'opts' at sweep.grid.methods[0]; did you mean 'options'?"
    )


def test_overrides():
    spec = parse_spec(raw(), (
        "ratios=[0.2,0.4]", "calibration.samples=32", "sweep.name=renamed", "grid.seeds=[1,2]",
        "submitit.cluster=local", "models=[{testbed: tiny-opt}, /some/dir]", "methods=[svd,svd-llm]",
        "eval.max_windows=null", "evals=[wikitext2]",
    ))
    assert spec.grid.ratios == (0.2, 0.4) and spec.calibration.samples == 32 and spec.name == "renamed"
    assert spec.grid.seeds == (1, 2) and spec.submitit.cluster == "local" and spec.eval.max_windows is None
    assert [m.label for m in spec.grid.models] == ["tiny-opt", "/some/dir"]
    assert spec.grid.methods == ("svd", "svd-llm")
    # overrides are validated exactly like the file
    assert error(raw(), ("ratioz=[0.2]",)) == "unknown key 'ratioz' at sweep; did you mean 'ratios'?"
    assert error(raw(), ("calibration.samplez=3",)) == "unknown key 'samplez' at sweep.calibration; did you mean 'samples'?"
    assert error(raw(), ("ratios=[1.2]",)) == (
        "bad ratio 1.2 at sweep.grid.ratios[0]: must lie in (0, 1) (the fraction of parameters removed)"
    )
    assert error(raw(), ("ratios",)) == "override 'ratios' must look like key=value, e.g. ratios=[0.2,0.4]"
    assert error(raw(name="x"), ("name.sub=1",)) == "override 'name.sub=1': sweep.name is not a mapping"
    # the input mapping is not modified
    original = raw()
    apply_overrides(original, ["ratios=[0.9]"])
    assert original["sweep"]["grid"]["ratios"] == [0.4]


def test_env_expansion(monkeypatch):
    monkeypatch.setenv("SWEEP_TEST_DIR", "/data/pack")
    spec = parse_spec(raw(calibration={"source": "file:${SWEEP_TEST_DIR}/valid.txt"}))
    assert spec.calibration.source == "file:/data/pack/valid.txt"
    monkeypatch.delenv("SWEEP_TEST_DIR")
    assert error(raw(calibration={"source": "file:${SWEEP_TEST_DIR}/v.txt"})) == (
        "environment variable SWEEP_TEST_DIR is not set (used at sweep.calibration.source)"
    )


def test_testbed_models_resolve_lazily(monkeypatch, caplog):
    monkeypatch.delitem(sys.modules, "harness.testbeds.trained", raising=False)
    assert parse_spec(raw(models=[{"reference": "tiny-llama"}])).grid.models[0].testbed == "tiny-llama"
    assert "'reference' is deprecated" in caplog.text  # the old key, kept for one release
    spec = parse_spec(raw(models=[{"testbed": "tiny-llama"}]))
    assert "harness.testbeds.trained" not in sys.modules  # parsing never imports it
    fake = types.ModuleType("harness.testbeds.trained")
    fake.ensure_testbed_model = lambda name: Path("/cache/reference") / name
    monkeypatch.setitem(sys.modules, "harness.testbeds.trained", fake)
    assert spec.grid.models[0].resolve() == "/cache/reference/tiny-llama"
    # A dry run never trains: an untrained testbed model is a clear error, a trained one its path.
    fake.testbed_model_path = lambda name: Path("/cache/reference") / name
    fake.is_trained = lambda path: False
    with pytest.raises(SpecError, match="'tiny-llama' is not trained yet.*a dry run does not train it"):
        spec.grid.models[0].resolve(build=False)
    fake.is_trained = lambda path: True
    assert spec.grid.models[0].resolve(build=False) == "/cache/reference/tiny-llama"
    monkeypatch.setitem(sys.modules, "harness.testbeds.trained", None)  # a build without the module
    with pytest.raises(SpecError, match="needs harness.testbeds.trained"):
        spec.grid.models[0].resolve()


def test_shipped_reference_leaderboard_spec(monkeypatch):
    """The reference leaderboard lists every registered method on SmolLM2-135M, 3 seeds."""
    path = ROOT / "benchmarks" / "reference_leaderboard.yaml"
    monkeypatch.setenv("SVDBENCH_DATA", "/pack")
    spec = load_spec(path)
    bases = {re.split(r"[+\[]", m, maxsplit=1)[0] for m in spec.grid.methods}
    assert bases == set(METHODS.names())
    assert spec.name == "reference-leaderboard" and spec.results == "results/reference"
    assert [m.id for m in spec.grid.models] == ["smollm2-135m"]
    assert spec.grid.ratios == (0.2, 0.4) and spec.grid.seeds == (0, 1, 2) and spec.evals == ("wikitext2",)
    assert spec.calibration.source == "file:/pack/wikitext-2-v1/valid.txt"
    assert (spec.calibration.samples, spec.calibration.seqlen) == (32, 256)
    assert (spec.eval.seqlen, spec.eval.window_stride, spec.svd_driver) == (1024, 48, "gram-eigh")
    assert load_spec(path, ["methods=[svd,svd-llm]"]).grid.methods == ("svd", "svd-llm")


@pytest.mark.parametrize("ablations, reference", [
    ("ablations_smollm2.yaml", "reference_leaderboard.yaml"),
    ("ablations_minilm.yaml", "reference_minilm.yaml"),
    ("ablations.yaml", "reference_tiny.yaml"),
    ("ablations_gemma3.yaml", "reference_gemma3.yaml"),
])
def test_shipped_ablation_specs_parse_every_variant(monkeypatch, ablations, reference):
    monkeypatch.setenv("SVDBENCH_DATA", "/pack")
    spec = load_spec(ROOT / "benchmarks" / ablations)
    # Every component of the three composite methods appears alone on top of svd-llm.
    for component in ("adacomp", "adacr", "residual", "last-layers", "column-preserving", "kl-knapsack"):
        assert any(m.startswith(f"svd-llm+{component}") for m in spec.grid.methods), component
    # Same calibration, evaluation and SVD routine as the reference leaderboard of the same model,
    # so shared cells have equal run keys.
    ref = load_spec(ROOT / "benchmarks" / reference)
    assert spec.calibration == ref.calibration and spec.eval == ref.eval and spec.svd_driver == ref.svd_driver
    assert {m.label for m in spec.grid.models} <= {m.label for m in ref.grid.models}


def test_strided_subset_and_offload_reach_the_run_config():
    from harness.sweep.plan import run_config

    spec = parse_spec(raw(eval={"seqlen": 1024, "window_stride": 12, "offload": "always"}))
    cfg = run_config(spec, "m", 0)
    assert cfg.eval_window_stride == 12 and cfg.eval_offload == "always" and cfg.eval_seqlen == 1024
    assert "positive" in error(raw(eval={"window_stride": 0}))
