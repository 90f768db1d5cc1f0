"""The engine on CUDA against the CPU float64 path (skipped without CUDA): factorization routines,
per-layer calibration errors of a whole cell, the measured Gram product, streamed evaluation."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from harness.engine.collect import choose_gram_product
from harness.runs import RunConfig, run
from methods._linalg import output_error, whitened_truncate, whitening
from tests.utils import CALIB, make_tiny_model_dir

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.parametrize("driver", ["svd", "gram-eigh"])
@pytest.mark.parametrize("shape", [(4096, 1024), (1024, 2816)])
def test_cuda_truncation_matches_cpu_float64(driver, shape):
    m, n = shape
    g = torch.Generator().manual_seed(0)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(3 * n, n, generator=g, dtype=torch.float64)
    x[:, :4] *= 50  # outlier channels
    h = x.T @ x
    k = int(0.6 * m * n / (m + n))
    a, b, _ = whitened_truncate(w, whitening(h), k, driver="svd")
    ref = output_error(w, a @ b, h)
    wc, hc = w.to(CUDA), h.to(CUDA)
    ac, bc, _ = whitened_truncate(wc, whitening(hc), k, driver=driver)
    assert output_error(wc, ac @ bc, hc) == pytest.approx(ref, rel=1e-6)


def test_half_precision_activations_use_the_fast_product_when_it_is_accurate():
    x = torch.randn(4096, 1024, device=CUDA, dtype=torch.float16)
    product, errors = choose_gram_product(x)
    assert errors["float32"] < 1e-5
    assert product.mode in {"half-to-float32", "float32"}
    if product.mode == "half-to-float32":
        assert errors["half-to-float32"] < 1e-5


def test_cuda_cell_matches_cpu_layer_by_layer(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    model = make_tiny_model_dir("llama", tmp_path / "llama")
    layers, ppl = {}, {}
    for device in ("cpu", "cuda"):
        cfg = RunConfig(model=str(model), methods=("svd-llm", "adasvd[adacomp.iters=2]"), ratios=(0.4,), device=device,
                        dtype="float32", calib=CALIB, calib_samples=16, calib_seqlen=128, eval_max_windows=8,
                        results=str(tmp_path / device))
        for path in run(cfg):
            rec = json.loads(path.read_text())
            ppl[(device, rec["method"]["name"])] = rec["metrics"]["wikitext2"]["ppl"]
            layers[(device, rec["method"]["name"])] = {r["name"]: r["calib_rel_error"] for r in rec["layers"]}
    for name in ("svd-llm", "adasvd[adacomp.iters=2]"):
        for layer, err in layers[("cpu", name)].items():
            assert layers[("cuda", name)][layer] == pytest.approx(err, rel=1e-6, abs=1e-9), (name, layer)
        assert ppl[("cuda", name)] == pytest.approx(ppl[("cpu", name)], rel=1e-3)


def test_streamed_evaluation_on_cuda_equals_resident(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    model = make_tiny_model_dir("llama", tmp_path / "llama")
    base = RunConfig(model=str(model), methods=("svd-llm",), ratios=(0.4,), device="cuda", dtype="float16", calib=CALIB,
                     calib_samples=8, calib_seqlen=64, eval_seqlen=128, eval_max_windows=8, results=str(tmp_path))
    ppl = {}
    for mode in ("never", "always"):
        cfg = dataclasses.replace(base, eval_offload=mode, results=str(tmp_path / mode))
        for path in run(cfg):
            rec = json.loads(path.read_text())
            ppl[(mode, rec["method"]["name"])] = rec["metrics"]["wikitext2"]["ppl"]
    for name in ("dense", "svd-llm"):
        assert ppl[("always", name)] == pytest.approx(ppl[("never", name)], rel=1e-3)
