from __future__ import annotations

import pytest
import torch

from methods import LowRankLinear, parse_method
from methods.components import LinearStats


@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_linear_equals_factors_times_input_plus_bias(bias):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 3, generator=g), torch.randn(3, 7, generator=g)
    bvec = torch.randn(12, generator=g) if bias else None
    mod = LowRankLinear(a, b, bvec)
    x = torch.randn(5, 4, 7, generator=g)
    ref = x @ (a @ b).T + (bvec if bias else 0)
    torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-5)
    assert mod.rank == 3 and sum(p.numel() for p in mod.parameters()) == 3 * 19 + (12 if bias else 0)


def test_factorizers_through_registry_keep_rank_and_storage():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(20, 30, generator=g, dtype=torch.float64)
    x = torch.randn(200, 30, generator=g, dtype=torch.float64)
    stats = LinearStats(x.T @ x, 200)
    for name in ("svd", "svd-llm"):
        fact = parse_method(name).factorizer.factorize(w, stats, 6)
        assert fact.rank == 6 and fact.param_count() == 6 * 50
