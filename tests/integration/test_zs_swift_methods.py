"""ZS-SVD and Swift-SVD on a tiny random Llama: through the runner with exports that load back, through
the sweep, and ZS-SVD refused on an encoder before anything loads (docs/methods/zs-svd.md, swift-svd.md)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
import torch
import yaml

from harness.cli import main
from harness.export import load_compressed, verify_export
from harness.runs import RunConfig, run
from methods import LowRankLinear, rank_for
from tests.utils import CALIB

pytestmark = pytest.mark.integration

METHODS = ("zs-svd", "swift-svd")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    """One statistics cache for the module: the sweep reuses the runner's Grams and gradients (same
    calibration), and either test still computes them when it runs alone."""
    return str(tmp_path_factory.mktemp("zs-swift-cache"))


def _rank_sums(layers: list[dict], rank_of) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for layer in layers:
        out[layer["kind"]] += rank_of(layer) or 0
    return dict(out)


def test_both_methods_through_the_runner_and_their_exports(tiny_llama, tmp_path, monkeypatch, cache):
    monkeypatch.setenv("SVDBENCH_CACHE", cache)
    cfg = RunConfig(model=str(tiny_llama), methods=METHODS, ratios=(0.4,), calib=CALIB, calib_samples=4,
                    calib_seqlen=32, eval_seqlen=64, eval_max_windows=1, device="cpu", results=str(tmp_path / "res"),
                    export=str(tmp_path / "exports"))
    records = [json.loads(p.read_text()) for p in run(cfg)]
    cells = {r["method"]["name"]: r for r in records if r["method"]["name"] != "dense"}
    layers = cells["zs-svd"]["layers"]
    rank_step = sum(sum(layer["shape"]) for layer in layers) / cells["zs-svd"]["params_dense"]
    for name in METHODS:
        rec = cells[name]
        assert rec["status"] == "ok" and rec["metrics"]["wikitext2"]["ppl"] is not None, name
        assert rec["params_compressed"] == sum(layer["params"] for layer in rec["layers"]), name
        assert 0.4 - 1e-9 <= rec["achieved_ratio"] <= 0.4 + rank_step, name
        assert all(layer["calib_rel_error"] < 1.0 for layer in rec["layers"]), name
        out = tmp_path / "exports" / rec["run_key"]
        assert verify_export(out)["parameters"] == rec["params_model_compressed"], name
        model, _ = load_compressed(out)
        ranks = {layer["name"]: layer["rank"] for layer in rec["layers"]}
        for mod_name, rank in ranks.items():
            mod = model.get_submodule(mod_name)
            assert (isinstance(mod, LowRankLinear) and mod.first.weight.shape[0] == rank) or rank is None, mod_name
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=torch.arange(1, 17)[None]).logits).all()
    zs = cells["zs-svd"]
    # ZS-SVD stops within one rank step of one module past the budget (uniform floors lose one per module).
    assert zs["achieved_ratio"] < 0.4 + max(sum(layer["shape"]) for layer in zs["layers"]) / zs["params_dense"]
    assert "gradient-sum" in zs["statistics"]["collected"]  # the gradient pass's statistic
    assert len({layer["rank"] for layer in zs["layers"] if layer["kind"] == "mlp.up_proj"}) > 1  # heterogeneous
    # Swift-SVD moves rank between blocks of one type but keeps the type's uniform rank sum and storage.
    swift = cells["swift-svd"]
    uniform = _rank_sums(layers, lambda layer: rank_for(*layer["shape"], 0.6))
    assert _rank_sums(swift["layers"], lambda layer: layer["rank"]) == uniform
    assert swift["params_compressed"] == sum(rank_for(*la["shape"], 0.6) * sum(la["shape"]) for la in layers)
    assert len({layer["rank"] for layer in swift["layers"] if layer["kind"] == "self_attn.q_proj"}) > 1


def test_both_methods_through_the_sweep(tiny_llama, tmp_path, monkeypatch, capsys, cache):
    monkeypatch.setenv("SVDBENCH_CACHE", cache)
    spec = {"sweep": {
        "name": "zs-swift", "results": str(tmp_path / "res"),
        "grid": {"models": [str(tiny_llama)], "methods": list(METHODS), "ratios": [0.5]},
        "calibration": {"source": CALIB, "samples": 4, "seqlen": 32},
        "eval": {"seqlen": 64, "max_windows": 1}, "device": "cpu",
    }}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    assert main(["sweep", str(path)]) == 0
    assert "3 run (3 ok, 0 failed)" in capsys.readouterr().out  # the dense cell and the two methods
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "3 done, 0 failed, 0 missing"
