"""ResSVD through the engine on tiny random-init models (2 blocks): budget, dense prefix, paired stream."""

from __future__ import annotations

import pytest
import torch

from harness.data import sample_calibration
from harness.engine.capture import capture_block_inputs
from harness.engine.compress import compress_model, restore
from harness.engine.models import discover, load_model
from harness.engine.statistics import CalibrationStatistics
from methods import LowRankLinear, parse_method
from tests.utils import DATA, make_tiny_model_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["llama"])
def setup(request, tmp_path_factory):
    path = make_tiny_model_dir(request.param, tmp_path_factory.mktemp("m") / request.param)
    model, tok = load_model(str(path))
    layout = discover(model)
    calib = sample_calibration(tok, f"file:{DATA / 'wikitext-2-v1' / 'valid.txt'}", 16, 64, 0)
    cpu = torch.device("cpu")

    def batches():
        return capture_block_inputs(model, layout, calib.input_ids, cpu)

    source = CalibrationStatistics.in_directory(model, layout, batches, cpu, tmp_path_factory.mktemp("stats"))
    return model, layout, source


def _compress(setup, method: str, ratio: float):
    model, layout, source = setup
    return compress_model(model, layout, parse_method(method), ratio, source)


@pytest.mark.parametrize("method", ["ressvd[last-layers.fraction=None]", "svd-llm+last-layers[last-layers.fraction=None]"])
def test_last_layers_budget_and_bitwise_dense_prefix(setup, method):
    model, layout, *_ = setup
    before = {k: v.clone() for k, v in layout.blocks[0].state_dict().items()}
    result = _compress(setup, method, 0.3)
    try:
        assert abs(result.achieved_ratio - 0.3) < 0.01
        # 0.3 of two equal blocks under the 0.8 cap: only the last block is compressed.
        after = layout.blocks[0].state_dict()
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert not any(isinstance(mod, LowRankLinear) for mod in layout.blocks[0].modules())
        assert any(isinstance(mod, LowRankLinear) for mod in layout.blocks[1].modules())
        ranks = {rep["block"]: rep["rank"] for rep in result.layers if rep["rank"] is not None}
        assert set(ranks) == {1}
    finally:
        restore(model, result)


def test_ratio_the_cap_cannot_meet_fails_before_factorizing(setup):
    with pytest.raises(ValueError, match="cannot be met"):
        _compress(setup, "ressvd", 0.9)


def test_first_compressed_block_sees_dense_inputs_so_ressvd_equals_whitened(setup):
    """Block 1 is the first compressed one: Xh = X there, the compressed stage 2 is the trap."""
    model, layout, *_ = setup
    res = _compress(setup, "ressvd[residual.stage2=compressed,residual.split=0.5,last-layers.blocks=1]", 0.4)
    dense_res = {m.name: model.get_submodule(m.name).dense_weight().detach() for m in layout.in_block(1)}
    assert all("calib_rel_error_compressed" in rep for rep in res.layers if rep["rank"] is not None)
    restore(model, res)
    ref = _compress(setup, "svd-llm+last-layers[last-layers.blocks=1]", 0.4)
    try:
        for name, w in dense_res.items():
            other = model.get_submodule(name).dense_weight().detach()
            assert float((w - other).norm() / other.norm()) < 1e-5, name
    finally:
        restore(model, ref)


def test_compressed_stage2_never_worse_than_svd_llm_on_compressed_inputs(setup):
    """Uniform + residual: block 1 sees inputs of a compressed block 0; split=1 is SVD-LLM."""
    model, *_ = setup
    errs = {}
    for split in (0.5, 1.0):
        result = _compress(setup, f"svd-llm+residual[residual.split={split},residual.stage2=compressed]", 0.4)
        errs[split] = {r["name"]: r["calib_rel_error_compressed"] for r in result.layers if r["block"] == 1}
        restore(model, result)
    for name, err in errs[0.5].items():
        assert err <= errs[1.0][name] * (1 + 1e-4) + 1e-7, name
    assert sum(errs[0.5].values()) < sum(errs[1.0].values())
