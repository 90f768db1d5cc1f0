"""Duo-SVD: column-preserving factorizer and KL-knapsack allocator on random tensors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from methods import ModuleInfo, parse_method, rank_for
from methods._linalg import output_error, rank_from_keep, whitened_truncate
from methods.column_preserving import (
    ColumnPreservingFactorization,
    ColumnPreservingFactorizer,
    ColumnPreservingLowRank,
    _TradeCurve,
    column_scores,
    columns_for_trade,
    search_trade,
)
from methods.components import AllocationContext, LinearStats
from methods.knapsack import KLKnapsackAllocator, candidate_keeps, option_cost, solve_greedy, solve_mckp


def _layer(seed: int, m: int, n: int, tokens: int = 400, outliers: int = 3) -> tuple[torch.Tensor, LinearStats]:
    """Random weight and a Gram with a few high-energy input channels (the case Duo-SVD targets)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    mix = torch.eye(n, dtype=torch.float64) + torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix
    x[:, torch.randperm(n, generator=g)[:outliers]] *= 15.0
    return w, LinearStats(x.T @ x, tokens)


def _outlier_columns_layer(seed: int = 1) -> tuple[torch.Tensor, LinearStats]:
    """``(32, 64)`` weight: rank 4 plus 6 large unstructured columns plus noise.

    Each large column costs a whole rank (m + n numbers) in a truncation but only m as a dense
    column, so at rank 6 trading 2 ranks for the 6 columns must pay off.
    """
    g = torch.Generator().manual_seed(seed)
    _, st = _layer(seed, 32, 64, outliers=0)
    w = torch.randn(32, 4, generator=g, dtype=torch.float64) @ torch.randn(4, 64, generator=g, dtype=torch.float64)
    w[:, :6] += 5 * torch.randn(32, 6, generator=g, dtype=torch.float64)
    return w + 0.05 * torch.randn(32, 64, generator=g, dtype=torch.float64), st


# -- column-preserving factorizer ------------------------------------------------------------------

@pytest.mark.parametrize("columns", ["exact", "refit"])
def test_zero_columns_equals_whitened_truncation_exactly(columns):
    w, st = _layer(0, 24, 40)
    a, b, s = whitened_truncate(w, st.whitening(), 7)
    fact = ColumnPreservingFactorizer(columns=columns, max_trade=0.0).factorize(w, st, 7)
    assert torch.equal(fact.a, a) and torch.equal(fact.b, b) and torch.equal(fact.spectrum, s)
    # The trade curve at zero columns is the same truncation (permuted Cholesky, same spectrum).
    curve = _TradeCurve(w, st.gram, torch.randperm(40), 7, columns)
    assert math.isclose(curve.error_sq(0), float(s[7:].pow(2).sum()), rel_tol=1e-9)
    torch.testing.assert_close(curve.build(0).dense(), a @ b, rtol=0, atol=1e-9)


@pytest.mark.parametrize("columns,search", list(itertools.product(["exact", "refit"], ["golden", "bracketed", "exhaustive"])))
def test_never_worse_than_whitened_truncation_at_equal_storage(columns, search):
    f = ColumnPreservingFactorizer(columns=columns, search=search)
    for seed, (m, n), rank in itertools.product(range(3), [(16, 48), (48, 16), (32, 32)], [2, 5, 9]):
        w, st = _layer(seed, m, n, outliers=seed)
        a, b, _ = whitened_truncate(w, st.whitening(), rank)
        base = output_error(w, a @ b, st.gram)
        fact = f.factorize(w, st, rank)
        assert fact.param_count() <= rank * (m + n)
        assert output_error(w, fact.dense(), st.gram) <= base * (1 + 1e-9)


def test_trade_helps_with_outlier_columns_and_refit_never_worse_than_exact():
    w, st = _outlier_columns_layer()
    rank = 6
    a, b, _ = whitened_truncate(w, st.whitening(), rank)
    base = output_error(w, a @ b, st.gram)
    order = torch.argsort(column_scores(w, st.gram, a @ b), descending=True)
    exact, refit = (_TradeCurve(w, st.gram, order, rank, mode) for mode in ("exact", "refit"))
    for traded in range(rank):
        assert refit.error_sq(traded) <= exact.error_sq(traded) * (1 + 1e-9) + 1e-12
        # The curve's value is the true output error of the built factorisation.
        built = exact.build(traded)
        assert math.isclose(output_error(w, built.dense(), st.gram) ** 2, exact.error_sq(traded), rel_tol=1e-7)
    fact = ColumnPreservingFactorizer().factorize(w, st, rank)
    assert isinstance(fact, ColumnPreservingFactorization) and fact.n_columns > 0
    assert output_error(w, fact.dense(), st.gram) < 0.5 * base
    assert set(fact.kept_idx.tolist()) >= set(range(6))


def test_storage_identity_holds_to_the_parameter():
    for m, n in [(16, 48), (48, 16), (64, 64), (688, 256), (128, 256)]:
        budget_rank = rank_from_keep(m, n, 0.6)
        for traded in range(budget_rank):
            c = columns_for_trade(m, n, budget_rank, traded)
            kept_rank = budget_rank - traded
            stored = kept_rank * (m + n - c) + m * c
            assert stored <= budget_rank * (m + n)
            # Floor is tight: one more column would exceed the budget (or there is no column left).
            assert traded == 0 or stored + m - kept_rank > budget_rank * (m + n) or c == n - kept_rank
            assert kept_rank <= n - c
    w, st = _outlier_columns_layer(2)
    fact = ColumnPreservingFactorizer().factorize(w, st, 6)
    assert isinstance(fact, ColumnPreservingFactorization)
    c, r = fact.n_columns, fact.rank
    assert c == columns_for_trade(32, 64, 6, 6 - r) > 0
    assert fact.param_count() == r * (32 + 64 - c) + 32 * c <= 6 * (32 + 64)
    mod = fact.to_module(torch.zeros(32), torch.float32, "cpu")
    assert sum(p.numel() for p in mod.parameters()) == fact.param_count() + 32  # + the bias, stored once


@pytest.mark.parametrize("bias", [True, False])
def test_column_preserving_module_applies_columns_plus_lowrank(bias):
    g = torch.Generator().manual_seed(3)
    kept, rest = torch.tensor([5, 1]), torch.tensor([0, 2, 3, 4, 6])
    cols, a, b = (torch.randn(*s, generator=g) for s in [(9, 2), (9, 3), (3, 5)])
    bvec = torch.randn(9, generator=g) if bias else None
    mod = ColumnPreservingLowRank(cols, a, b, kept, rest, bvec)
    ref = ColumnPreservingFactorization(a.double(), b.double(), cols.double(), kept, rest).dense()
    x = torch.randn(4, 3, 7, generator=g)
    torch.testing.assert_close(mod(x), x @ ref.float().T + (bvec if bias else 0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mod.dense_weight(), ref, rtol=1e-6, atol=1e-6)
    assert {"kept_idx", "rest_idx"} <= set(mod.state_dict())
    assert mod.to(torch.float64).kept_idx.dtype == torch.long


def test_singular_gram_uses_the_fallback_and_stays_finite():
    w, st = _layer(4, 24, 40, tokens=20, outliers=2)  # 20 tokens < 40 inputs: H is singular
    for columns in ("exact", "refit"):
        fact = ColumnPreservingFactorizer(columns=columns).factorize(w, st, 8)
        assert torch.isfinite(fact.dense()).all()
        assert fact.info["whitening"] == "eigen"


def test_search_finds_the_minimum():
    def convex(x: int) -> float:
        return (x - 13) ** 2 + 1.0

    for mode in ("golden", "bracketed", "exhaustive"):
        assert search_trade(convex, 40, mode)[0] == 13
    def two_dips(x: int) -> float:
        return min((x - 4) ** 2 + 5.0, (x - 33) ** 2 + 1.0)

    assert search_trade(two_dips, 40, "bracketed")[0] == 33
    best, seen = search_trade(lambda x: float(x), 40, "golden")
    assert best == 0 and 0 in seen and len(seen) < 15


def test_min_gain_rejects_small_trades():
    w, st = _outlier_columns_layer(5)
    fact = ColumnPreservingFactorizer().factorize(w, st, 6)
    gain = fact.info["best_gain"]
    assert 0 < gain < 0.98 and fact.info["columns"] > 0
    assert ColumnPreservingFactorizer(min_gain=gain + 0.01).factorize(w, st, 6).info["columns"] == 0


# -- knapsack ----------------------------------------------------------------------------------------

def _brute_force(losses, costs, budget, floor=0):
    best = None
    for combo in itertools.product(*[range(len(row)) for row in losses]):
        cost = sum(costs[j][o] for j, o in enumerate(combo))
        if floor <= cost <= budget:
            loss = sum(losses[j][o] for j, o in enumerate(combo))
            if best is None or loss < best[0]:
                best = (loss, combo)
    return best


@pytest.mark.parametrize("seed", range(25))
def test_dynamic_program_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n_mod = 2 + seed % 4
    n_opt = 2 + seed % 3
    losses = torch.randn(n_mod, n_opt, generator=g, dtype=torch.float64).tolist()
    costs = torch.randint(0, 12, (n_mod, n_opt), generator=g).tolist()
    budget = int(sum(min(r) for r in costs) + torch.randint(0, 20, (1,), generator=g))
    floor = max(0, budget - int(torch.randint(0, 15, (1,), generator=g)))
    for lo in (0, floor):
        ref = _brute_force(losses, costs, budget, lo)
        if ref is None:
            continue
        picks = solve_mckp(losses, costs, budget, lo)
        assert lo <= sum(costs[j][o] for j, o in enumerate(picks)) <= budget
        assert math.isclose(sum(losses[j][o] for j, o in enumerate(picks)), ref[0], abs_tol=1e-12)
        assert tuple(picks) == ref[1]  # random float losses: the optimum is unique


def test_greedy_respects_the_budget():
    g = torch.Generator().manual_seed(0)
    costs = [[1, 3, 6, 10]] * 6
    losses = [sorted(torch.rand(4, generator=g).tolist(), reverse=True) for _ in range(6)]
    for budget in (6, 20, 40, 60):
        picks = solve_greedy(losses, costs, budget)
        assert sum(c[o] for c, o in zip(costs, picks, strict=True)) <= budget
        exact = solve_mckp(losses, costs, budget)
        loss = sum(lj[o] for lj, o in zip(losses, picks, strict=True))
        assert loss >= sum(lj[o] for lj, o in zip(losses, exact, strict=True)) - 1e-12


def _tiny_llama_modules(blocks: int = 3) -> list[ModuleInfo]:
    shapes = {"q": (256, 256), "k": (128, 256), "v": (128, 256), "o": (256, 256),
              "gate": (688, 256), "up": (688, 256), "down": (256, 688)}
    return [ModuleInfo(f"model.layers.{b}.{k}", b, k, *s) for b in range(blocks) for k, s in shapes.items()]


def _fake_probe(modules, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = {m.name: float(torch.rand(1, generator=g)) * 3 + 0.1 for m in modules}

    def probe(candidates, n_sequences, base_keep):
        # Convex, decreasing deviation; modules differ in sensitivity.
        return {m.name: {p: weight[m.name] * (1 - p) ** 2 + 0.01 for p in candidates} for m in modules}

    return probe


@pytest.mark.parametrize("ratio,solver,budget", [(0.2, "dp", "uniform"), (0.4, "dp", "uniform"), (0.6, "dp", "ratio"),
                                                 (0.4, "greedy", "uniform"), (0.8, "dp", "uniform")])
def test_allocator_achieves_the_requested_ratio(ratio, solver, budget):
    modules = _tiny_llama_modules()
    ctx = AllocationContext(modules, 3, probes={"kl_sensitivity": _fake_probe(modules)})
    alloc = KLKnapsackAllocator(solver=solver, budget=budget).allocate(ctx, ratio)
    total = sum(m.params for m in modules)
    stored = sum(option_cost(m, alloc[m.name]) for m in modules)
    assert abs((1 - stored / total) - ratio) <= 0.01
    uniform = sum(option_cost(m, 1 - ratio) for m in modules)
    if budget == "uniform":
        assert stored <= uniform  # equal storage to SVD-LLM at most
    assert len(set(alloc.values())) > 1  # modules of different sensitivity get different keeps
    assert all(rank_for(m.out_features, m.in_features, alloc[m.name]) is not None or alloc[m.name] == 1.0 for m in modules)


def test_allocator_needs_the_probe_and_candidates_include_the_base():
    with pytest.raises(RuntimeError, match="kl_sensitivity"):
        KLKnapsackAllocator().allocate(AllocationContext(_tiny_llama_modules(1), 1), 0.4)
    assert candidate_keeps(0.55, 0.1, 0.1) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0]
    assert candidate_keeps(0.6, 0.25, 0.25) == [0.25, 0.5, 0.6, 0.75, 1.0]


def test_registry_compositions():
    duo = parse_method("duo-svd").config()
    assert duo["allocator"]["name"] == "kl-knapsack" and duo["factorizer"]["name"] == "column-preserving"
    assert parse_method("svd-llm+column-preserving").config()["allocator"]["name"] == "uniform"
    assert parse_method("svd-llm+kl-knapsack").config()["factorizer"]["name"] == "whitened"
    opt = parse_method("duo-svd[kl-knapsack.n_sequences=8,column-preserving.min_gain=0.01]").config()
    assert opt["allocator"]["n_sequences"] == 8 and opt["factorizer"]["min_gain"] == 0.01
    with pytest.raises(ValueError):
        parse_method("duo-svd[column-preserving.search=random]")
