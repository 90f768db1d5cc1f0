"""Duo-SVD on a tiny 2-block llama: the KL probe (replay, restore, cache) and a full runner cell."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.data import sample_calibration
from harness.engine.capture import capture_block_inputs
from harness.engine.models import discover, fingerprint, get_module, load_model
from harness.engine.probes.kl_sensitivity import KLSensitivityProbe
from harness.engine.statistics import CalibrationStatistics
from harness.runs import RunConfig, run
from methods import ModuleInfo
from methods.column_preserving import ColumnPreservingLowRank
from methods.knapsack import option_cost
from methods.statistics import InputGram
from tests.utils import CALIB

pytestmark = pytest.mark.integration



def test_kl_probe_replay_restore_and_cache(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path))
    model, tok = load_model(str(tiny_llama), "float32")
    layout = discover(model)
    calib = sample_calibration(tok, CALIB, 6, 48, 0)
    cpu = torch.device("cpu")
    source = CalibrationStatistics.in_directory(
        model, layout, lambda: capture_block_inputs(model, layout, calib.input_ids, cpu), cpu, tmp_path / "stats")
    source.load_all()
    before = {m.name: get_module(model, m.name) for m in layout.modules}
    weights = {n: mod.weight.detach().clone() for n, mod in before.items()}
    info = fingerprint(str(tiny_llama))
    keeps = [0.3, 0.6, 1.0]

    def probe(**kw) -> KLSensitivityProbe:
        return KLSensitivityProbe(model, layout, lambda i: source.load(i, [InputGram()])[0], calib.input_ids, cpu, info,
                                  batch_size=2, **kw)

    fast = probe()
    table = fast(keeps, 4, 0.6)
    full = probe(skip_prefix=False, use_cache=False)(keeps, 4, 0.6)
    # Replaying the unperturbed blocks' cached outputs gives the same numbers as full forwards.
    for name, row in table.items():
        for p in keeps:
            assert row[p] == pytest.approx(full[name][p], rel=1e-5, abs=1e-9)
    assert set(table) == {m.name for m in layout.modules}
    base = next(iter(table.values()))[0.6]
    assert base > 0 and all(row[0.6] == base for row in table.values())
    # Dropping a module to keep 0.3 moves the model further from dense than the base state.
    assert sum(row[0.3] for row in table.values()) > len(table) * base
    # The model is restored: same module objects and weights.
    for name, mod in before.items():
        assert get_module(model, name) is mod and isinstance(mod, nn.Linear)
        assert torch.equal(mod.weight, weights[name])
    assert fast.last_cost["hit"] is False and fast.last_cost["forwards"] == 4 * (2 + 2 * len(table))
    again = probe()
    assert again(keeps, 4, 0.6) == table and again.last_cost["hit"] is True
    assert len(list((tmp_path / "sensitivity").glob("*.json"))) == 1


def test_duo_svd_cell_through_the_runner(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    method = "duo-svd[kl-knapsack.n_sequences=2,kl-knapsack.step=0.3]"
    cfg = RunConfig(model=str(tiny_llama), methods=(method,), ratios=(0.4,), calib=CALIB, calib_samples=8,
                    calib_seqlen=32, eval_seqlen=32, eval_max_windows=2, device="cpu", results=str(tmp_path / "res"))
    paths = run(cfg)
    rec = json.loads(paths[-1].read_text())
    assert rec["status"] == "ok" and rec["method"]["config"]["allocator"]["name"] == "kl-knapsack"
    # Budget = the uniform allocation's storage (SVD-LLM's): never above it, at most 0.5 % below.
    # (On this 64-wide toy the rank floor alone puts the uniform allocation at ratio ~0.41.)
    mods = [ModuleInfo(layer["name"], 0, "", *layer["shape"]) for layer in rec["layers"]]
    uniform = 1 - sum(option_cost(m, 0.6) for m in mods) / rec["params_dense"]
    assert uniform - 1e-9 <= rec["achieved_ratio"] <= uniform + 0.005 + 1e-9
    assert abs(uniform - 0.4) <= 0.02
    assert rec["params_compressed"] == sum(layer["params"] for layer in rec["layers"])
    assert all(layer["calib_rel_error"] < 1.0 for layer in rec["layers"])
    assert list((tmp_path / "cache" / "sensitivity").glob("*.json"))
    cost = rec["probes"]["kl_sensitivity"]
    assert cost["measure"] == "kl" and cost["hit"] is False and cost["forwards"] > 0


def test_column_preserving_module_in_a_model(tiny_llama: Path):
    """A column-preserving layer swapped into the model reproduces its dense weight's outputs."""
    from methods.column_preserving import ColumnPreservingFactorization

    model, _ = load_model(str(tiny_llama), "float32")
    lin = get_module(model, discover(model).modules[0].name)
    w = lin.weight.detach().double()
    n = w.shape[1]
    kept, rest = torch.arange(0, n, 7), torch.tensor([i for i in range(n) if i % 7])
    u, s, vh = torch.linalg.svd(w[:, rest], full_matrices=False)
    fact = ColumnPreservingFactorization(u * s, vh, w[:, kept], kept, rest)  # full rank: exact
    mod = fact.to_module(lin.bias, torch.float32, "cpu")
    assert isinstance(mod, ColumnPreservingLowRank)
    x = torch.randn(3, n)
    torch.testing.assert_close(mod(x), lin(x), rtol=1e-4, atol=1e-5)
