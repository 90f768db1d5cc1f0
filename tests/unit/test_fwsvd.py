"""FWSVD: the Fisher-weighted factorizer and the squared-gradient statistic on random tensors."""

from __future__ import annotations

import pytest
import torch

from harness.engine.gradients import next_token_nll
from methods import parse_method
from methods.components import LinearStats
from methods.fisher import SquaredGradients
from methods.fwsvd import FisherWeightedFactorizer, fisher_scale, fisher_truncate
from methods.statistics import GramProduct
from methods.svd import PlainFactorizer

CPU = torch.device("cpu")


def _w(seed: int, m: int, n: int) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("axis", ["rows", "inputs"])
@pytest.mark.parametrize("m,n,k", [(24, 40, 5), (40, 24, 9)])
def test_uniform_fisher_is_plain_svd_bit_for_bit(axis, m, n, k):
    w = _w(k, m, n)
    st = LinearStats(fisher_rows=torch.full((m,), 3.7, dtype=torch.float64),
                     fisher_cols=torch.full((n,), 0.2, dtype=torch.float64))
    fact = FisherWeightedFactorizer(axis=axis).factorize(w, st, k)
    plain = PlainFactorizer().factorize(w, st, k)
    assert torch.equal(fact.a, plain.a) and torch.equal(fact.b, plain.b)


@pytest.mark.parametrize("axis", ["rows", "inputs"])
def test_weighted_truncation_is_optimal_in_the_weighted_norm(axis):
    """Eckart-Young on D W (rows) or W D (inputs): no rank-k matrix, plain SVD included, has a lower
    Fisher-weighted error."""
    m, n, k = 30, 20, 4
    w = _w(1, m, n)
    imp = torch.rand(m if axis == "rows" else n, generator=torch.Generator().manual_seed(2), dtype=torch.float64) ** 4
    d = fisher_scale(imp)
    a, b, sigma = fisher_truncate(w, d, k, axis)

    def weighted(err: torch.Tensor) -> float:
        return float((d[:, None] * err if axis == "rows" else err * d).norm())

    plain = PlainFactorizer().factorize(w, None, k)
    ours = weighted(w - a @ b)
    assert ours == pytest.approx(float(sigma[k:].pow(2).sum().sqrt()), rel=1e-9)
    assert ours < weighted(w - plain.dense())


def test_rows_without_gradient_are_floored_and_bad_importances_are_errors():
    w = _w(3, 12, 8)
    imp = torch.ones(12, dtype=torch.float64)
    imp[5] = 0.0
    fact = FisherWeightedFactorizer().factorize(w, LinearStats(fisher_rows=imp), 3)
    assert torch.isfinite(fact.dense()).all()
    for bad in (torch.full((12,), float("inf"), dtype=torch.float64), torch.zeros(12, dtype=torch.float64)):
        with pytest.raises(FloatingPointError):
            FisherWeightedFactorizer().factorize(w, LinearStats(fisher_rows=bad), 3)
    with pytest.raises(ValueError, match="squared-gradients"):
        FisherWeightedFactorizer().factorize(w, LinearStats(), 3)


def test_squared_gradient_statistic_sums_rows_and_columns_over_windows():
    g1, g2 = _w(4, 5, 3), _w(5, 5, 3)
    acc = SquaredGradients().accumulator(3, CPU, GramProduct())
    acc.add(g1, None, 0)
    acc.add(g2, None, 1)
    out = acc.result()
    sq = g1.pow(2) + g2.pow(2)
    torch.testing.assert_close(out["fisher_rows"], sq.sum(1), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(out["fisher_cols"], sq.sum(0), rtol=1e-6, atol=1e-8)
    assert int(out["fisher_windows"]) == 2 and SquaredGradients().scope == "gradient"


def test_next_token_nll_matches_cross_entropy_and_skips_padding():
    g = torch.Generator().manual_seed(0)
    logits, ids = torch.randn(2, 6, 11, generator=g), torch.randint(0, 11, (2, 6), generator=g)
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1))
    assert float(next_token_nll(logits, ids, None)) == pytest.approx(float(ref), rel=1e-6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    ref_masked = torch.cat([torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none"),
                            torch.nn.functional.cross_entropy(logits[1, :2], ids[1, 1:3], reduction="none")]).mean()
    assert float(next_token_nll(logits, ids, mask)) == pytest.approx(float(ref_masked), rel=1e-6)


def test_registry_composition_declares_gradients_and_a_causal_lm():
    method = parse_method("fwsvd")
    assert method.config()["factorizer"] == {"name": "fisher-weighted", "axis": "rows"}
    assert [s.key for s in method.statistics()] == ["gram", "squared-gradients"]
    assert any("next-token" in r for r in method.causal_lm_reasons())
    assert parse_method("fwsvd[fisher-weighted.axis=inputs]").config()["factorizer"]["axis"] == "inputs"
    with pytest.raises(ValueError):
        parse_method("fwsvd[fisher-weighted.axis=cols]")
