"""ZS-SVD on random tensors: the singular sensitivities against exact and autograd loss changes, the
zero-sum selection's budget and rule, and the allocator end to end (docs/methods/zs-svd.md)."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from methods import AllocationContext, LinearStats, ModuleInfo, parse_method, rank_for
from methods._linalg import whitening
from methods.eigen_whitening import eigen_whitening
from methods.gradient_sum import GradientSum, mean_gradient
from methods.zero_sum import (
    ZeroSumAllocator,
    keep_for_rank,
    loss_changes,
    min_rank,
    singular_sensitivities,
    stored_params,
    whitened_gradient,
    zero_sum_select,
)
from tests.utils import random_layer

D = torch.float64


_layer = functools.partial(random_layer, scales=(0.2, 2.0))


@pytest.mark.parametrize("tokens", [40, 6])  # positive-definite Gram (Cholesky) and singular (eigen)
def test_whitened_gradient_is_the_gradient_in_whitened_coordinates(tokens):
    _, _, h = _layer(5, 8, tokens)
    white = whitening(h)
    assert white.method == ("cholesky" if tokens > 8 else "eigen")
    g = torch.randn(5, 8, dtype=D)
    torch.testing.assert_close(whitened_gradient(g, white), g @ torch.linalg.inv(white.factor).T, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("tokens", [40, 6])
def test_sensitivity_is_the_exact_loss_change_of_a_linear_loss(tokens):
    """For ``L(W) = <C, W>`` the first-order change is exact: dropping ``s_i`` changes L by ``-s_i g_i``."""
    w, _, h = _layer(6, 9, tokens)
    white = whitening(h)
    c = torch.randn(6, 9, dtype=D)
    s, g = singular_sensitivities(w, white, c)
    u, s_ref, vh = torch.linalg.svd(w @ white.factor, full_matrices=False)
    torch.testing.assert_close(s, s_ref)
    delta = loss_changes(s, g)
    for i in range(s.numel()):
        dropped = w - white.right_solve(s[i] * u[:, i:i + 1] @ vh[i:i + 1])  # W with s_i set to 0
        assert float((c * dropped).sum() - (c * w).sum()) == pytest.approx(float(delta[i]), rel=1e-9, abs=1e-9)


def test_sensitivity_is_the_autograd_first_order_change_of_a_quadratic_loss():
    """``L(W) = 1/2 ||(W - W0) X||^2 + <C, W>``: ``delta_i`` is the derivative of ``L`` along the path
    that scales ``s_i`` from its value to zero, ``W(t) = W - t s_i u_i v_i^T T^{-1}`` at ``t = 0``."""
    w, x, h = _layer(7, 10, 30, seed=1)
    w0, c = torch.randn(7, 10, dtype=D), torch.randn(7, 10, dtype=D)

    def loss(weight):
        return 0.5 * ((weight - w0) @ x).pow(2).sum() + (c * weight).sum()

    wr = w.clone().requires_grad_(True)
    loss(wr).backward()
    white = whitening(h)
    s, g = singular_sensitivities(w, white, wr.grad)
    u, _, vh = torch.linalg.svd(w @ white.factor, full_matrices=False)
    delta, second = loss_changes(s, g), loss_changes(s, g, "second-order")
    for i in (0, 3, 6):
        t = torch.zeros((), dtype=D, requires_grad=True)
        (deriv,) = torch.autograd.grad(loss(w - t * white.right_solve(s[i] * u[:, i:i + 1] @ vh[i:i + 1])), t)
        assert float(deriv) == pytest.approx(float(delta[i]), rel=1e-8)
        assert float(second[i] - delta[i]) == pytest.approx(0.5 * float(s[i] * g[i]) ** 2)


def _modules(shapes):
    return [ModuleInfo(f"m{i}", i // 2, "k", m, n) for i, (m, n) in enumerate(shapes)]


SHAPES = [(12, 20), (20, 12), (16, 16), (8, 24), (24, 24), (10, 30)]


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_selection_meets_the_parameter_budget_exactly_as_the_engine_counts(ratio):
    mods = _modules(SHAPES)
    gen = torch.Generator().manual_seed(2)
    deltas = {m.name: torch.randn(min(m.out_features, m.in_features), generator=gen, dtype=D) for m in mods}
    total = sum(m.params for m in mods)
    budget = math.ceil(ratio * total)
    floors = {m.name: min_rank(m, ZeroSumAllocator().fraction(ratio)) for m in mods}
    sel = zero_sum_select(mods, deltas, budget, floors)
    stored = {m.name: stored_params(m, sel.ranks[m.name]) for m in mods}
    assert sel.removed == total - sum(stored.values())
    assert budget <= sel.removed < budget + max(m.out_features + m.in_features for m in mods)
    assert all(sel.ranks[m.name] >= floors[m.name] for m in mods)
    # What the engine stores from the keeps (rank_for) is exactly what the selection counted.
    for m in mods:
        keep = keep_for_rank(m, sel.ranks[m.name])
        k = rank_for(m.out_features, m.in_features, keep)
        assert (m.params if k is None else k * (m.out_features + m.in_features)) == stored[m.name]
        assert k is None or k == sel.ranks[m.name]
    assert len({keep_for_rank(m, sel.ranks[m.name]) for m in mods}) > 2  # heterogeneous ranks


def test_running_sum_stays_within_one_delta_of_zero_while_both_signs_remain():
    mods = [ModuleInfo(f"m{i}", i, "k", 16, 16) for i in range(16)]
    gen = torch.Generator().manual_seed(4)
    deltas = {m.name: torch.rand(16, generator=gen, dtype=D) * (1 if i % 2 else -1) for i, m in enumerate(mods)}
    sel = zero_sum_select(mods, deltas, budget=int(0.3 * 16 * 256), floors={m.name: 1 for m in mods})
    assert abs(sel.running_sum) <= 1.0
    one_sign = [sum(16 - sel.ranks[m.name] for j, m in enumerate(mods) if j % 2 == p) for p in (0, 1)]
    assert min(one_sign) > 0.3 * sum(one_sign)  # both signs are drawn on


def test_selection_follows_the_zero_sum_rule_on_a_hand_made_case():
    """Tails (last entries) are offered first; with running sum <= 0 the smallest positive is taken,
    otherwise the smallest negative, and each module keeps dropping from its own tail."""
    a, b = ModuleInfo("a", 0, "k", 4, 4), ModuleInfo("b", 0, "k", 4, 4)
    deltas = {"a": torch.tensor([9.0, 9.0, 0.5, 0.1], dtype=D), "b": torch.tensor([-9.0, -9.0, -0.3, -0.2], dtype=D)}
    # r* = 1 for 4x4: dropping to rank 1 removes 16 - 8 = 8 parameters.
    sel = zero_sum_select([a, b], deltas, budget=8, floors={"a": 1, "b": 1})
    # order: a(+0.1) -> sum 0.1 > 0 -> b(-0.2) -> -0.1 -> a(+0.5) -> 0.4 -> b(-0.3) -> 0.1 -> b(-9) reaches rank 1
    assert sel.ranks == {"a": 2, "b": 1} and sel.removed == 8 and sel.dropped == 5
    assert sel.running_sum == pytest.approx(0.1 - 0.2 + 0.5 - 0.3 - 9.0)


def test_min_rank_rule_and_an_infeasible_budget():
    alloc = ZeroSumAllocator()
    assert alloc.fraction(0.2) == alloc.fraction(0.4) == 0.0 and alloc.fraction(0.6) == 0.3
    assert ZeroSumAllocator(min_rank_fraction=0.1).fraction(0.6) == 0.1
    mod = ModuleInfo("a", 0, "k", 64, 64)  # r* = 31
    assert min_rank(mod, 0.0) == 1 and min_rank(mod, 0.3) == 10
    with pytest.raises(ValueError, match="min_rank_fraction"):
        zero_sum_select([mod], {"a": torch.ones(64, dtype=D)}, budget=mod.params, floors={"a": 10})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        parse_method("zs-svd[zero-sum.min_rank_fraction=2]")


def test_allocator_reads_the_store_and_meets_the_ratio():
    shapes = [(16, 24), (24, 16), (16, 16), (8, 16)]
    mods = [ModuleInfo(f"b{b}.{k}", b, k, m, n) for b in range(3) for k, (m, n) in zip("qrst", shapes, strict=True)]
    weights, stats = {}, {}
    for i, mod in enumerate(mods):
        w, _, h = _layer(mod.out_features, mod.in_features, 60, seed=10 + i)
        weights[mod.name] = w
        stats[mod.name] = LinearStats(gram=h, tokens=60, grad_sum=torch.randn(w.shape, dtype=torch.float32) * (i + 1),
                                      grad_windows=torch.tensor(4))
    reads = []

    def load_block(b):
        reads.append(b)
        return {m.name: stats[m.name] for m in mods if m.block == b}

    ctx = AllocationContext(mods, 3, load_block=load_block, load_weight=weights.__getitem__)
    alloc = parse_method("zs-svd").allocator
    keeps = alloc.allocate(ctx, 0.4)
    assert reads == [0, 1, 2] and GradientSum() in parse_method("zs-svd").statistics()
    total = sum(m.params for m in mods)
    stored = 0
    for m in mods:
        k = rank_for(m.out_features, m.in_features, keeps[m.name])
        stored += m.params if k is None else k * (m.out_features + m.in_features)
    assert 0.4 <= 1 - stored / total < 0.4 + max(m.out_features + m.in_features for m in mods) / total
    torch.testing.assert_close(mean_gradient(stats["b0.q"]), stats["b0.q"].get("grad_sum").double() / 4)
    with pytest.raises(ValueError, match="gradient-sum"):
        mean_gradient(LinearStats(gram=torch.eye(3, dtype=D)))
    with pytest.raises(RuntimeError, match="through the harness"):
        alloc.allocate(AllocationContext(mods, 3), 0.4)


def test_eigen_whitening_gives_the_same_sensitivities_on_a_definite_gram():
    """The sensitivities do not depend on which square root of ``H`` whitens (``T`` vs ``T Q``)."""
    w, _, h = _layer(6, 9, 50, seed=3)
    g = torch.randn(6, 9, dtype=D)
    s1, g1 = singular_sensitivities(w, whitening(h), g)
    s2, g2 = singular_sensitivities(w, eigen_whitening(h), g)
    torch.testing.assert_close(s1, s2)
    torch.testing.assert_close(s1 * g1, s2 * g2)
