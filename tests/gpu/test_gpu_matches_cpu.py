"""The same cell on CUDA and on the CPU gives perplexities within 1% (skipped without CUDA)."""

from __future__ import annotations

import json

import pytest

from harness.runs import RunConfig, run
from tests.utils import DATA, make_tiny_model_dir

pytestmark = pytest.mark.gpu


def test_cuda_perplexity_matches_cpu(tmp_path):
    model_dir = make_tiny_model_dir("llama", tmp_path / "llama")
    ppl = {}
    for device in ("cpu", "cuda"):
        cfg = RunConfig(model=str(model_dir), methods=("svd", "svd-llm"), ratios=(0.4,), device=device, dtype="float32",
                        calib=f"file:{DATA / 'wikitext-2-v1' / 'valid.txt'}", calib_samples=16, calib_seqlen=128,
                        eval_max_windows=32, results=str(tmp_path / device))
        for path in run(cfg):
            rec = json.loads(path.read_text())
            ppl[(device, rec["method"]["name"])] = rec["metrics"]["wikitext2"]["ppl"]
    for name in ("dense", "svd", "svd-llm"):
        assert ppl[("cuda", name)] == pytest.approx(ppl[("cpu", name)], rel=0.01)
