"""Swift-SVD on random tensors: the output-covariance truncation is the exact activation-aware optimum
(and SVD-LLM's truncation on a definite Gram), and the dynamic allocation spends exactly the uniform
budget of each projection type (docs/methods/swift-svd.md)."""

from __future__ import annotations

import pytest
import torch

from methods import AllocationContext, LinearStats, ModuleInfo, parse_method, rank_for
from methods._linalg import whitened_truncate, whitening
from methods.block_similarity import BlockCosine
from methods.eigen_whitening import eigen_whitening
from methods.output_covariance import output_covariance_truncate
from methods.swift_allocation import (
    SwiftDynamicAllocator,
    block_influence_factors,
    break_even_rank,
    output_energy,
    type_ranks,
)
from tests.utils import random_layer

D = torch.float64


_layer = random_layer


def _err2(w, approx, x):
    return float(((w - approx) @ x).pow(2).sum())


@pytest.mark.parametrize("m,n", [(12, 16), (20, 10)])  # m < n, and m > n (an up_proj)
def test_truncation_is_the_exact_optimum_and_equals_svd_llm_on_a_definite_gram(m, n):
    w, x, h = _layer(m, n, 80)
    k = 4
    a, b, s = output_covariance_truncate(w, h, k)
    approx = a @ b
    evals = torch.linalg.eigvalsh(w @ h @ w.T).flip(0)
    assert _err2(w, approx, x) == pytest.approx(float(evals[k:].clamp(min=0).sum()), rel=1e-9)
    # Eckart-Young on W X: no rank-k matrix does better.
    sv = torch.linalg.svdvals(w @ x)
    assert _err2(w, approx, x) == pytest.approx(float(sv[k:].pow(2).sum()), rel=1e-9)
    torch.testing.assert_close(s[: min(m, n)], sv[: min(m, n)], rtol=1e-8, atol=1e-8)
    # SVD-LLM's whitened truncation gives the same W' and spectrum.
    wa, wb, ws = whitened_truncate(w, whitening(h), k)
    torch.testing.assert_close(approx, wa @ wb, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(s[: ws.numel()], ws, rtol=1e-8, atol=1e-8)
    # A random rank-k competitor and plain SVD do worse.
    gen = torch.Generator().manual_seed(5)
    q, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=D))
    assert _err2(w, q @ q.T @ w, x) > _err2(w, approx, x)
    u, sw, vh = torch.linalg.svd(w, full_matrices=False)
    assert _err2(w, (u[:, :k] * sw[:k]) @ vh[:k], x) > _err2(w, approx, x)
    assert torch.allclose(a.T @ a, torch.eye(k, dtype=D), atol=1e-10)  # A = Q_k orthonormal


def test_singular_gram_stays_exact_without_any_floor():
    w, x, h = _layer(10, 16, 6, seed=1)  # 6 tokens: H has rank 6
    k = 3
    a, b, _ = output_covariance_truncate(w, h, k)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    sv = torch.linalg.svdvals(w @ x)
    assert _err2(w, a @ b, x) == pytest.approx(float(sv[k:].pow(2).sum()), rel=1e-8, abs=1e-10)
    ea, eb, _ = whitened_truncate(w, eigen_whitening(h), k)  # SVD-LLM V2's clamped route
    assert _err2(w, a @ b, x) <= _err2(w, ea @ eb, x) * (1 + 1e-9)
    with pytest.raises(FloatingPointError, match="zero"):
        output_covariance_truncate(w, torch.zeros(16, 16, dtype=D), k)
    bad = h.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        output_covariance_truncate(w, bad, k)


def test_factorizer_reports_the_spectrum_and_uniform_method_matches_svd_llm():
    w, _, h = _layer(12, 16, 50, seed=2)
    fact = parse_method("svd-llm+output-covariance").factorizer.factorize(w, LinearStats(gram=h, tokens=50), 5)
    ref = parse_method("svd-llm").factorizer.factorize(w, LinearStats(gram=h, tokens=50), 5)
    torch.testing.assert_close(fact.dense(), ref.dense(), rtol=1e-8, atol=1e-8)
    assert fact.rank == 5 and fact.param_count() == 5 * (12 + 16)
    assert output_energy(w, h) == pytest.approx(float(fact.spectrum.pow(2).sum().sqrt()), rel=1e-9)


def test_influence_factors_are_min_max_normalised():
    f = block_influence_factors([0.9, 0.5, 0.7])  # influence 0.1, 0.5, 0.3
    assert f[0] == pytest.approx(1.0) and f[1] == pytest.approx(2.0, abs=1e-5) and f[2] == pytest.approx(1.5, abs=1e-5)


def _mods(n_blocks: int, shapes: dict[str, tuple[int, int]]) -> list[ModuleInfo]:
    return [ModuleInfo(f"b{b}.{k}", b, k, m, n) for b in range(n_blocks) for k, (m, n) in shapes.items()]


SHAPES = {"q": (32, 32), "k": (8, 32), "up": (80, 32), "down": (32, 80)}


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_type_ranks_spend_the_uniform_budget_within_caps(ratio):
    gen = torch.Generator().manual_seed(3)
    for kind, (m, n) in SHAPES.items():
        mods = [ModuleInfo(f"b{b}.{kind}", b, kind, m, n) for b in range(6)]
        scores = (torch.rand(6, generator=gen, dtype=D) + 0.1).tolist()
        ranks = type_ranks(mods, scores, 1 - ratio, 0.25)
        uniform = rank_for(m, n, 1 - ratio)
        assert sum(ranks) == 6 * uniform, kind
        assert all(1 <= r <= break_even_rank(mods[0]) for r in ranks)
        top, bottom = max(range(6), key=scores.__getitem__), min(range(6), key=scores.__getitem__)
        assert ranks[top] >= ranks[bottom]


def test_allocator_stores_the_uniform_parameters_and_favours_influential_blocks():
    mods = _mods(4, SHAPES)
    cosines = [0.95, 0.6, 0.9, 0.8]  # block 1 changes the residual stream most
    energies = {m.name: 10.0 for m in mods}
    alloc = SwiftDynamicAllocator()
    keeps = alloc.solve(mods, alloc.scores(mods, cosines, energies), 0.4)

    def stored(keep_of):
        total = 0
        for m in mods:
            k = rank_for(m.out_features, m.in_features, keep_of(m))
            total += m.params if k is None else k * (m.out_features + m.in_features)
        return total

    assert stored(lambda m: keeps[m.name]) == stored(lambda m: 0.6)  # exactly the uniform allocation's storage
    for kind in SHAPES:
        assert keeps[f"b1.{kind}"] >= keeps[f"b2.{kind}"] >= keeps[f"b0.{kind}"]
    assert keeps["b1.q"] > keeps["b0.q"]
    # alpha = 0: the energy alone decides (equal energies -> equal scores).
    flat = SwiftDynamicAllocator(alpha=0.0)
    flat_keeps = flat.solve(mods, flat.scores(mods, cosines, energies), 0.4)
    assert len({flat_keeps[f"b{b}.q"] for b in range(4)}) == 1


def test_allocator_reads_the_store_and_the_block_cosines():
    mods = _mods(2, {"q": (12, 16), "o": (16, 12)})
    weights, stats = {}, {}
    for i, mod in enumerate(mods):
        w, _, h = _layer(mod.out_features, mod.in_features, 40, seed=20 + i)
        weights[mod.name], stats[mod.name] = w * (i + 1), LinearStats(gram=h, tokens=40)
    ctx = AllocationContext(mods, 2, block_values=[{"block_cosine": 0.9}, {"block_cosine": 0.7}],
                            load_block=lambda b: {m.name: stats[m.name] for m in mods if m.block == b},
                            load_weight=weights.__getitem__)
    method = parse_method("swift-svd")
    assert BlockCosine() in method.statistics() and not method.causal_lm_reasons()
    keeps = method.allocator.allocate(ctx, 0.5)
    assert set(keeps) == {m.name for m in mods} and all(0 < v < 1 for v in keeps.values())
    with pytest.raises(ValueError, match="block_cosine"):
        method.allocator.allocate(AllocationContext(mods, 2), 0.5)
    with pytest.raises(ValueError, match="alpha"):
        parse_method("swift-svd[swift-dynamic.alpha=2]")
