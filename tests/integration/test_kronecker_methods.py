"""GFWSVD and KFAC-SVD on a tiny random Llama: the output-gradient feed of the gradient pass against
autograd, both methods through the runner (with an export round trip) and the sweep, and the encoder
refusal before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from harness.cli import main
from harness.data import sample_calibration
from harness.engine.gradients import gradient_pass, next_token_nll
from harness.engine.models import count_params, discover, get_module, load_model
from harness.export import load_compressed
from harness.runs import RunConfig, run
from methods.fisher import SquaredGradients
from methods.kronecker import OutputGradientGram
from methods.lowrank import LowRankLinear
from tests.utils import CALIB

pytestmark = pytest.mark.integration

METHODS = ("gfwsvd", "kfac-svd")


def test_output_gradient_feed_matches_autograd_beside_weight_gradients(tiny_llama):
    model, tok = load_model(str(tiny_llama), "float32")
    layout = discover(model)
    ids = sample_calibration(tok, CALIB, 2, 24, 0).input_ids
    plain = OutputGradientGram(edge_fraction=0.0, clip=False)
    only = gradient_pass(model, layout, ids, None, torch.device("cpu"), [plain])
    both = gradient_pass(model, layout, ids, None, torch.device("cpu"), [plain, SquaredGradients()])
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # flags restored, nothing kept
    outputs: dict[str, torch.Tensor] = {}

    def keep(name: str):
        def hook(_mod, _args, out: torch.Tensor) -> None:
            out.retain_grad()
            outputs[name] = out

        return hook

    hooks = [get_module(model, m.name).register_forward_hook(keep(m.name)) for m in layout.modules]
    expected = {m.name: torch.zeros(m.out_features, m.out_features, dtype=torch.float64) for m in layout.modules}
    for j in range(ids.shape[0]):  # reference: plain autograd, one window at a time
        model.zero_grad(set_to_none=True)
        next_token_nll(model(input_ids=ids[j: j + 1], use_cache=False).logits, ids[j: j + 1], None).backward()
        for m in layout.modules:
            delta = outputs[m.name].grad.reshape(-1, m.out_features).double()
            expected[m.name] += delta.T @ delta
    for h in hooks:
        h.remove()
    model.zero_grad(set_to_none=True)
    for m in layout.modules:
        for out in (only, both):
            torch.testing.assert_close(out[m.block][m.name]["grad_out_gram"], expected[m.name], rtol=1e-4, atol=1e-14)
            assert int(out[m.block][m.name]["grad_out_tokens"]) == 2 * 24
        assert both[m.block][m.name]["fisher_rows"].shape == (m.out_features,)


def _config(model: Path, results: Path, **kw) -> RunConfig:
    return RunConfig(model=str(model), methods=METHODS, ratios=(0.4,), calib=CALIB, calib_samples=4, calib_seqlen=32,
                     eval_seqlen=64, eval_max_windows=2, device="cpu", results=str(results), **kw)


def test_both_methods_through_the_runner_with_an_export_round_trip(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    records = [json.loads(p.read_text()) for p in run(_config(tiny_llama, tmp_path / "res",
                                                              export=str(tmp_path / "exports")))]
    cells = {r["method"]["name"]: r for r in records if r["method"]["name"] != "dense"}
    rank_step = sum(sum(layer["shape"]) for layer in cells["gfwsvd"]["layers"]) / cells["gfwsvd"]["params_dense"]
    for name in METHODS:
        rec = cells[name]
        assert rec["status"] == "ok" and rec["metrics"]["wikitext2"]["ppl"] is not None, name
        assert 0.4 - 1e-9 <= rec["achieved_ratio"] <= 0.4 + rank_step, name
        assert all(layer["calib_rel_error"] < 1.5 for layer in rec["layers"]), name
        model, _ = load_compressed(rec["export"]["path"])
        assert count_params(model) == rec["params_model_compressed"], name
        ranks = {layer["name"]: layer["rank"] for layer in rec["layers"]}
        assert {n: m.first.weight.shape[0] for n, m in model.named_modules() if isinstance(m, LowRankLinear)} == ranks
    assert cells["gfwsvd"]["statistics"]["pass_seconds"]["kronecker-fisher[group=1,tol=1e-06,max_iter=100]"] > 0
    assert all("shrink_in" in layer["info"] for layer in cells["gfwsvd"]["layers"])


def test_both_methods_through_the_sweep(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    spec = {"sweep": {
        "name": "kronecker", "results": str(tmp_path / "res"),
        "grid": {"models": [str(tiny_llama)], "methods": ["gfwsvd[factorizer.estimator=one-step]", "kfac-svd"],
                 "ratios": [0.5]},
        "calibration": {"source": CALIB, "samples": 4, "seqlen": 32},
        "eval": {"seqlen": 64, "max_windows": 2}, "device": "cpu",
    }}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    assert main(["sweep", str(path)]) == 0
    assert "3 run (3 ok, 0 failed)" in capsys.readouterr().out  # the dense cell and the two methods
