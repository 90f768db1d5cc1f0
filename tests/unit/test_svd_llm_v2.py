"""SVD-LLM V2: eigen-whitened truncation and the heterogeneous allocator on random tensors."""

from __future__ import annotations

import math

import pytest
import torch

from methods import ModuleInfo, parse_method, rank_for
from methods._linalg import output_error, whitened_truncate
from methods.components import AllocationContext, LinearStats
from methods.eigen_whitening import EigenWhitenedFactorizer, eigen_whitening
from methods.heterogeneous import HeterogeneousAllocator, group_ratios, loss_scale
from methods.svd_llm import WhitenedFactorizer


def _layer(seed: int, m: int, n: int, tokens: int) -> tuple[torch.Tensor, LinearStats]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, n, dtype=torch.float64)
    return w, LinearStats(x.T @ x, tokens)


@pytest.mark.parametrize("m,n,k", [(24, 40, 5), (40, 24, 9), (32, 32, 16)])
def test_equals_svd_llm_on_a_positive_definite_gram(m, n, k):
    w, st = _layer(k, m, n, tokens=400)
    assert st.whitening().method == "cholesky"
    ours = EigenWhitenedFactorizer().factorize(w, st, k)
    v1 = WhitenedFactorizer().factorize(w, st, k)
    torch.testing.assert_close(ours.dense(), v1.dense(), rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(ours.spectrum, v1.spectrum, rtol=1e-8, atol=1e-9)
    assert ours.info == {}  # no clamping, and never reported as a whitening fallback


def test_finite_on_a_singular_gram_and_loss_is_the_dropped_spectrum():
    w, st = _layer(3, 24, 40, tokens=15)  # 15 tokens < 40 inputs: H has rank 15
    fact = EigenWhitenedFactorizer().factorize(w, st, 6)
    assert torch.isfinite(fact.dense()).all() and fact.info["clamped_eigenvalues"] >= 25
    # Clamped directions carry no activation: the loss is still the dropped whitened spectrum.
    err = output_error(w, fact.dense(), st.gram)
    assert err == pytest.approx(math.sqrt(float(fact.spectrum[6:].pow(2).sum())), rel=1e-6)
    v1 = WhitenedFactorizer().factorize(w, st, 6)
    assert err <= output_error(w, v1.dense(), st.gram) * (1 + 1e-6)
    white = eigen_whitening(st.gram)
    torch.testing.assert_close(white.factor @ white.factor.T, st.gram, rtol=0, atol=1e-6 * float(st.gram.abs().max()))
    with pytest.raises(FloatingPointError):
        eigen_whitening(torch.zeros(4, 4, dtype=torch.float64))


def test_group_ratios_keep_the_mean_and_favour_lossy_matrices():
    losses, params = [5.0, 30.0, 400.0, 900.0], [100] * 4
    r = group_ratios(losses, params, 0.4, offset=1.5, cap=0.9)
    assert sum(r) / 4 == pytest.approx(0.4, rel=1e-12)
    assert r == sorted(r, reverse=True)  # larger loss -> smaller compression ratio
    # The paper's formula Len(L_G) R L_G[i] / Sum(L_G), L_G = 1 / log(L + offset), when nothing is capped.
    w = [1 / math.log(x + 1.5) for x in losses]
    assert r == pytest.approx([4 * 0.4 * wi / sum(w) for wi in w], rel=1e-12)
    capped = group_ratios([0.0, 1e6, 1e6], [100, 100, 100], 0.6, offset=1.5, cap=0.7)
    assert max(capped) == pytest.approx(0.7) and sum(capped) / 3 == pytest.approx(0.6, rel=1e-9)
    unequal = group_ratios([1.0, 5.0], [300, 100], 0.3, offset=1.5, cap=0.9)
    assert (300 * unequal[0] + 100 * unequal[1]) / 400 == pytest.approx(0.3, rel=1e-12)
    with pytest.raises(ValueError, match="cap"):
        group_ratios([1.0], [10], 0.95, offset=1.5, cap=0.9)


def test_allocator_reads_one_block_at_a_time_and_hits_the_ratio_within_a_rank_step():
    shapes = {"q": (48, 48), "k": (24, 48), "o": (48, 48), "up": (96, 48), "down": (48, 96)}
    blocks = 4
    modules = [ModuleInfo(f"b{b}.{k}", b, k, *s) for b in range(blocks) for k, s in shapes.items()]
    data = {m.name: _layer(hash(m.name) % 1000, m.out_features, m.in_features, tokens=200 + 40 * m.block)
            for m in modules}
    asked: list[int] = []

    def load_block(b):
        asked.append(b)
        return {m.name: data[m.name][1] for m in modules if m.block == b}

    ctx = AllocationContext(modules, blocks, load_block=load_block, load_weight=lambda name: data[name][0])
    for ratio in (0.2, 0.5):
        asked.clear()
        alloc = HeterogeneousAllocator().allocate(ctx, ratio)
        assert asked == list(range(blocks))
        total = sum(m.params for m in modules)
        stored = sum(rank_for(m.out_features, m.in_features, alloc[m.name]) * (m.out_features + m.in_features)
                     for m in modules)
        step = sum(m.out_features + m.in_features for m in modules) / total  # one rank of every module
        assert ratio <= 1 - stored / total <= ratio + step
        for kind in shapes:  # each type group removes the target ratio of its own parameters
            group = [m for m in modules if m.kind == kind]
            assert sum(1 - alloc[m.name] for m in group) / len(group) == pytest.approx(ratio, rel=1e-9)
        losses = HeterogeneousAllocator().losses(ctx, ratio)
        q = [m for m in modules if m.kind == "q"]
        by_loss = sorted(q, key=lambda m: losses[m.name])
        assert [alloc[m.name] for m in by_loss] == sorted(alloc[m.name] for m in q)  # more loss, more kept
        w, st = data[q[0].name]
        k = rank_for(48, 48, 1 - ratio)
        a, b, _ = whitened_truncate(w, st.whitening(), k)
        assert losses[q[0].name] == pytest.approx(output_error(w, a @ b, st.gram), rel=1e-6)


def test_registry_composition():
    m = parse_method("svd-llm-v2")
    assert m.config()["allocator"] == {"name": "heterogeneous", "offset": 1.5, "cap": 0.9}
    assert m.config()["factorizer"]["name"] == "eigen-whitened" and m.allocation_uses_calibration
    assert not m.causal_lm_reasons()
    with pytest.raises(ValueError):
        parse_method("svd-llm-v2[heterogeneous.offset=1.0]")


# -- loss scale: absolute (the paper as written) vs per-token (calibration-size invariant) -----------

def _repeated_calibration(copies: int):
    """Modules of three types over four blocks, each with inputs ``X`` of 120 tokens repeated ``copies``
    times (the Gram and the token count both multiply by ``copies``; nothing else changes)."""
    shapes = {"q": (32, 32), "up": (64, 32), "down": (32, 64)}
    modules = [ModuleInfo(f"b{b}.{k}", b, k, *s) for b in range(4) for k, s in shapes.items()]
    weights, stats = {}, {}
    for i, m in enumerate(modules):
        g = torch.Generator().manual_seed(i)
        weights[m.name] = torch.randn(m.out_features, m.in_features, generator=g, dtype=torch.float64) * (0.05 + 0.1 * i)
        x = torch.randn(120, m.in_features, generator=g, dtype=torch.float64) * torch.linspace(0.05, 1, m.in_features,
                                                                                             dtype=torch.float64)
        xs = torch.cat([x] * copies)
        stats[m.name] = LinearStats(xs.T @ xs, xs.shape[0])
    ctx = AllocationContext(modules, 4, load_block=lambda b: {m.name: stats[m.name] for m in modules if m.block == b},
                            load_weight=weights.__getitem__)
    return ctx


def test_per_token_allocation_is_unchanged_when_the_calibration_is_repeated():
    once, twice = _repeated_calibration(1), _repeated_calibration(2)
    per_token = HeterogeneousAllocator(loss="per-token")
    for ratio in (0.2, 0.4):
        a, b = per_token.allocate(once, ratio), per_token.allocate(twice, ratio)
        assert max(abs(a[k] - b[k]) for k in a) < 1e-9
        # The per-token loss is the absolute one over sqrt(T): the RMS output error per token.
        absolute, scaled = HeterogeneousAllocator().losses(once, ratio), per_token.losses(once, ratio)
        assert all(scaled[k] == pytest.approx(absolute[k] / math.sqrt(120), rel=1e-12) for k in absolute)


def test_absolute_allocation_depends_on_the_calibration_size():
    """The paper's absolute loss grows like sqrt(T); 1 / log(L + offset) is not scale-free."""
    once, twice = _repeated_calibration(1), _repeated_calibration(2)
    absolute = HeterogeneousAllocator()
    assert absolute.loss == "absolute"  # the default is unchanged until it is measured
    la, lb = absolute.losses(once, 0.4), absolute.losses(twice, 0.4)
    assert all(lb[k] == pytest.approx(math.sqrt(2) * la[k], rel=1e-9) for k in la)
    a, b = absolute.allocate(once, 0.4), absolute.allocate(twice, 0.4)
    assert max(abs(a[k] - b[k]) for k in a) > 1e-3


def test_loss_option_is_documented_checked_and_keeps_old_run_keys():
    # Records written before the option existed ran the absolute loss: their config (run key) is unchanged,
    # and naming the old reading explicitly resolves to the same config; another value enters the config.
    default = parse_method("svd-llm-v2").config()
    assert default["allocator"] == {"name": "heterogeneous", "offset": 1.5, "cap": 0.9}
    assert parse_method("svd-llm-v2[heterogeneous.loss=absolute]").config() == default
    per_token = parse_method("svd-llm-v2[heterogeneous.loss=per-token]").config()["allocator"]
    assert per_token == {"name": "heterogeneous", "offset": 1.5, "cap": 0.9, "loss": "per-token"}
    with pytest.raises(ValueError, match="heterogeneous.loss must be one of"):
        parse_method("svd-llm-v2[heterogeneous.loss=relative]")
    with pytest.raises(ValueError, match="token"):
        loss_scale(LinearStats(torch.eye(3, dtype=torch.float64), 0), "per-token")
    assert loss_scale(LinearStats(torch.eye(3, dtype=torch.float64), 0), "absolute") == 1.0
