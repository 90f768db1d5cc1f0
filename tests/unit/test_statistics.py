"""Declared statistics on random tensors: accumulation, masking, pairing, name clashes, the product check."""

from __future__ import annotations

import pytest
import torch

from harness.engine.collect import choose_gram_product
from methods import parse_method
from methods.block_similarity import BlockCosine
from methods.stack_of_batch import StackedGrams
from methods.statistics import CompressedPrefixGrams, GramProduct, InputGram, union

CPU = torch.device("cpu")


def _x(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_input_gram_sums_masked_tokens_only():
    x = _x(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    acc = InputGram().accumulator(4, CPU, GramProduct())
    acc.add(x[:2], mask[:2], 0)
    acc.add(x[2:], mask[2:], 1)
    rows = x[mask]
    out = acc.result()
    assert int(out["tokens"]) == int(mask.sum()) == rows.shape[0]
    torch.testing.assert_close(out["gram"], rows.double().T @ rows.double(), rtol=1e-6, atol=1e-6)


def test_compressed_prefix_grams_pair_token_aligned_inputs():
    x, xh = _x(2, 6, 3), _x(2, 6, 3, seed=1)
    acc = CompressedPrefixGrams().accumulator(3, CPU, GramProduct("float64"))
    acc.add(x, None, 0, xh=xh)
    out = acc.result()
    a, b = x.reshape(-1, 3).double(), xh.reshape(-1, 3).double()
    torch.testing.assert_close(out["gram_hat"], b.T @ b)
    torch.testing.assert_close(out["cross"], a.T @ b)
    with pytest.raises(ValueError, match="paired"):
        acc.add(x, None, 1)


def test_block_cosine_is_the_mean_over_real_tokens():
    x, y = _x(2, 4, 8), _x(2, 4, 8, seed=3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    acc = BlockCosine().accumulator(0, CPU, GramProduct())
    acc.add(x, mask, 0, xh=y)
    expected = torch.nn.functional.cosine_similarity(x, y, dim=-1)[mask].mean()
    assert float(acc.result()["block_cosine"]) == pytest.approx(float(expected), rel=1e-6)


def test_stacked_grams_refuse_padding_and_too_few_samples():
    acc = StackedGrams(4).accumulator(3, CPU, GramProduct())
    with pytest.raises(ValueError, match="padded"):
        acc.add(_x(2, 5, 3), torch.ones(2, 5, dtype=torch.bool), 0)
    acc.add(_x(2, 5, 3), None, 0)
    with pytest.raises(ValueError, match="exceeds"):
        acc.result()


def test_union_dedupes_and_refuses_clashing_result_names():
    assert [s.key for s in union([InputGram(), InputGram(), BlockCosine()])] == ["gram", "block-cosine"]
    with pytest.raises(ValueError, match="both produce"):
        union([StackedGrams(2), StackedGrams(4)])


def test_methods_declare_what_they_need():
    def keys(spec: str) -> list[str]:
        return [s.key for s in parse_method(spec).statistics()]

    assert keys("svd") == keys("svd-llm") == keys("duo-svd") == ["gram"]
    assert keys("adasvd") == ["gram", "block-cosine", "compressed-prefix-grams"]
    assert "stacked-grams[mini_bsz=4,seed=0,paired=1]" in keys("svd-llm+adacomp[adacomp.stack_of_batch=4]")
    assert parse_method("ressvd[residual.stage2=compressed]").needs_compressed_inputs and not parse_method("svd-llm").needs_compressed_inputs
    assert parse_method("duo-svd").probes == ("kl_sensitivity",) and parse_method("svd").probes == ()
    assert parse_method("adasvd").allocation_uses_calibration and not parse_method("ressvd").allocation_uses_calibration


def test_gram_product_check_keeps_float32_on_cpu_and_reports_its_error():
    product, errors = choose_gram_product(_x(256, 64))
    assert product.mode == "float32" and 0 <= errors["float32"] < 1e-5
    # A tolerance below float32's rounding forces the float64 product.
    product, _ = choose_gram_product(_x(256, 64), tol=0.0)
    assert product.mode == "float64"
