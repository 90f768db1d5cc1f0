"""AdaSVD on a tiny 2-block llama: the paired statistics pass, adaComp's gain, the ablation strings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from harness.data import sample_calibration
from harness.engine.capture import capture_block_inputs
from harness.engine.compress import compress_model, restore
from harness.engine.models import discover, load_model
from harness.engine.statistics import CalibrationStatistics
from harness.runs import RunConfig, run
from methods import parse_method
from methods.stack_of_batch import StackedGrams, batch_permutation
from methods.statistics import GramProduct
from tests.utils import CALIB

pytestmark = pytest.mark.integration



def _paired_error(model, layout, source, method: str, ratio: float) -> tuple[float, float]:
    res = compress_model(model, layout, parse_method(method), ratio, source)
    try:
        errs = [layer["calib_rel_error_compressed"] for layer in res.layers if layer["rank"] is not None]
        return sum(errs), res.achieved_ratio
    finally:
        restore(model, res)


def test_adacomp_dense_target_lowers_error_against_dense_outputs(tiny_llama: Path, tmp_path: Path):
    """calib_rel_error_compressed (||W' Xh - W X|| / ||W X||) of adaComp (target=dense) below its tau = 0 start.

    svd-llm does not collect paired statistics, so the fair baseline is the same refiner with
    iters=0: the whitened factors measured on the same compressed-prefix inputs.
    """
    model, tok = load_model(str(tiny_llama), "float32")
    layout = discover(model)
    calib = sample_calibration(tok, CALIB, 8, 64, 0)

    def batches():
        return capture_block_inputs(model, layout, calib.input_ids, torch.device("cpu"))

    source = CalibrationStatistics.in_directory(model, layout, batches, torch.device("cpu"), tmp_path)
    base, r0 = _paired_error(model, layout, source, "svd-llm+adacomp[adacomp.iters=0,adacomp.target=dense]", 0.6)
    refined, r1 = _paired_error(model, layout, source, "svd-llm+adacomp[adacomp.iters=5,adacomp.target=dense]", 0.6)
    assert r0 == pytest.approx(r1) and refined < base


def test_stacker_averages_shuffled_groups_exactly():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 4, generator=g)  # (samples, seq, n)
    xh = x + 0.1 * torch.randn(5, 3, 4, generator=g)
    st = StackedGrams(2, paired=True).accumulator(4, torch.device("cpu"), GramProduct())
    perms = []
    for batch, (lo, hi) in enumerate(((0, 3), (3, 5))):  # groups span the two batches; the fifth sample is dropped
        st.add(x[lo:hi], None, batch, xh=xh[lo:hi])
        perms.append(lo + batch_permutation(hi - lo, 0, batch))
    order = torch.cat(perms)
    xs, xhs = x[order], xh[order]
    means = [xs[0:2].mean(0), xs[2:4].mean(0)]
    means_h = [xhs[0:2].mean(0), xhs[2:4].mean(0)]
    out = st.result()
    torch.testing.assert_close(out["gram_stacked"], sum(m.T.double() @ m.double() for m in means))
    torch.testing.assert_close(out["cross_stacked"],
                               sum(a.T.double() @ b.double() for a, b in zip(means, means_h, strict=True)))


def test_ablation_strings_run_end_to_end(tiny_llama: Path, tmp_path: Path):
    methods = ("svd-llm+adacomp[adacomp.iters=2]", "svd-llm+adacr", "adasvd[adacomp.iters=2,adacomp.stack_of_batch=2]")
    cfg = RunConfig(model=str(tiny_llama), methods=methods, ratios=(0.4,), calib=CALIB, calib_samples=8,
                    calib_seqlen=32, eval_seqlen=64, eval_max_windows=2, results=str(tmp_path))
    records = [json.loads(p.read_text()) for p in run(cfg)]
    cells = {r["method"]["name"]: r for r in records if r["method"]["name"] != "dense"}
    assert set(cells) == set(methods)
    for rec in cells.values():
        assert rec["status"] == "ok" and rec["achieved_ratio"] == pytest.approx(0.4, abs=0.02)
    keeps = {layer["keep"] for layer in cells["svd-llm+adacr"]["layers"]}
    assert len(keeps) == 2  # one keep per block
    stacked = cells[methods[2]]["layers"][0]["info"]["adacomp_history"]
    assert len(stacked) == 3
