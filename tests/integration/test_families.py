"""The engine on every supported family (random-init tiny models): discovery, GQA shapes,
achieved ratio, finite perplexity, and svd-llm's per-layer calibration error never above svd's."""

from __future__ import annotations

import json

import pytest

from harness.runs import RunConfig, run
from tests.utils import DATA, make_tiny_model_dir

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt", "gpt_neox", "gemma3"])
def test_family_end_to_end(family, tmp_path):
    model_dir = make_tiny_model_dir(family, tmp_path / family)
    results = tmp_path / "results"
    cfg = RunConfig(
        model=str(model_dir), methods=("svd", "svd-llm"), ratios=(0.4,),
        calib=f"file:{DATA / 'wikitext-2-v1' / 'valid.txt'}", calib_samples=8, calib_seqlen=64,
        eval_seqlen=128, eval_max_windows=8, results=str(results),
    )
    paths = run(cfg)
    records = {json.loads(p.read_text())["method"]["name"]: json.loads(p.read_text()) for p in paths}
    assert set(records) == {"dense", "svd", "svd-llm"}
    for name, rec in records.items():
        ppl = rec["metrics"]["wikitext2"]
        assert ppl["nonfinite_windows"] == 0 and ppl["ppl"] is not None and ppl["ppl"] > 1
        assert ppl["protocol"] == "wikitext2@128:first8"
        if name != "dense":
            # one rank step of a 64-wide matrix is 2/64 of its parameters
            assert abs(rec["achieved_ratio"] - 0.4) < 2 / 64 + 1e-9
            assert rec["params_compressed"] < rec["params_dense"]
            assert rec["achieved_ratio_model"] < rec["achieved_ratio"]
    svd = {layer["name"]: layer["calib_rel_error"] for layer in records["svd"]["layers"]}
    for layer in records["svd-llm"]["layers"]:
        assert layer["calib_rel_error"] <= svd[layer["name"]] + 1e-9, layer["name"]
    # a re-run finds every cell done and recomputes nothing
    mtimes = {p: p.stat().st_mtime_ns for p in paths}
    assert run(cfg) == paths
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in paths)
