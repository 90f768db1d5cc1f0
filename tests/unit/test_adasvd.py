"""AdaSVD: adaComp alternating least squares, adaCR allocation, registry (random tensors, CPU)."""

from __future__ import annotations

import pytest
import torch

from methods import AllocationContext, LinearStats, ModuleInfo, parse_method, rank_for
from methods._linalg import truncated_svd, whitened_truncate, whitening
from methods.adacomp import (
    AdaCompRefiner,
    PairedGrams,
    alternate,
    balance,
    objective,
    reduced_rank_optimum,
    u_step,
    v_step,
)
from methods.adacr import AdaCRAllocator, block_importance, budgeted_keeps
from methods.lowrank import Factorization

F64 = torch.float64


def _problem(m: int = 12, n: int = 10, tokens: int = 200, noise: float = 0.3, seed: int = 0):
    """W, dense inputs X (n, N) with anisotropic channels and compressed-model inputs Xh = X + E."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=F64)
    scales = torch.logspace(0, -2, n, dtype=F64)
    mix = torch.randn(n, n, generator=g, dtype=F64)
    x = mix @ (scales[:, None] * torch.randn(n, tokens, generator=g, dtype=F64))
    xh = x + noise * x.std() * torch.randn(n, tokens, generator=g, dtype=F64)
    return w, x, xh


def _stats(x: torch.Tensor, xh: torch.Tensor) -> LinearStats:
    return LinearStats(x @ x.T, x.shape[1], xh @ xh.T, x @ xh.T)


def _grams(x: torch.Tensor, xh: torch.Tensor) -> PairedGrams:
    return PairedGrams(x @ x.T, xh @ xh.T, x @ xh.T)


def test_objective_matches_materialised_activations():
    w, x, xh = _problem()
    a, b, _ = truncated_svd(w, 4)
    direct = float(((a @ b @ xh - w @ x) ** 2).sum())
    assert objective(w, a, b, _grams(x, xh)) == pytest.approx(direct, rel=1e-10)


def test_u_step_matches_direct_least_squares():
    w, x, xh = _problem(seed=1)
    grams = _grams(x, xh)
    _, b, _ = truncated_svd(w, 4)
    a = u_step(w @ grams.cross, b, grams.gram_hat)
    # min_A ||A (B Xh) - W X||_F  <=>  (B Xh)^T A^T = (W X)^T in the least-squares sense.
    a_ls = torch.linalg.lstsq((b @ xh).T, (w @ x).T).solution.T
    torch.testing.assert_close(a, a_ls, rtol=1e-8, atol=1e-10)


def test_v_step_matches_direct_least_squares():
    w, x, xh = _problem(m=9, n=7, tokens=60, seed=2)
    grams = _grams(x, xh)
    a, _, _ = truncated_svd(w, 3)
    b = v_step(w @ grams.cross, a, whitening(grams.gram_hat))
    # vec(A B Xh) = (Xh^T kron A) vec(B) with column-major vec.
    design = torch.kron(xh.T.contiguous(), a.contiguous())
    b_ls = torch.linalg.lstsq(design, (w @ x).T.reshape(-1, 1)).solution.reshape(7, 3).T
    torch.testing.assert_close(b, b_ls, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("init", ["plain", "whitened"])
def test_objective_never_increases_compressed_inputs(init):
    w, x, xh = _problem(seed=3)
    grams = _grams(x, xh)
    k = 4
    a0, b0, _ = truncated_svd(w, k) if init == "plain" else whitened_truncate(w, whitening(grams.gram), k)
    a, b, hist = alternate(w, a0, b0, grams, 30)
    assert all(h1 <= h0 * (1 + 1e-12) for h0, h1 in zip(hist, hist[1:], strict=False))
    assert hist[-1] < hist[0]  # the start is not optimal for Xh: adaComp must gain
    # ... and it can never beat the reduced-rank-regression optimum, which it approaches.
    best = objective(w, *reduced_rank_optimum(w, grams, k), grams)
    assert best * (1 - 1e-9) <= min(hist) <= best * 1.02
    assert objective(w, a, b, grams) == pytest.approx(min(hist), rel=1e-12)


def test_trap_original_inputs_whitened_start_is_already_optimal():
    """With inputs=original the whitened truncation is the global optimum: nothing to gain."""
    w, x, _ = _problem(seed=4)
    stats = LinearStats(x @ x.T, x.shape[1])
    k = 4
    a0, b0, s = whitened_truncate(w, stats.whitening(), k)
    grams = PairedGrams.original(stats.gram)
    _, _, hist = alternate(w, a0, b0, grams, 10, white_hat=stats.whitening())
    assert hist[0] == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-9)
    assert max(abs(h - hist[0]) for h in hist) <= 1e-9 * hist[0]
    out = AdaCompRefiner(iters=10, inputs="original", init="whitened").refine(w, Factorization(a0, b0), stats)
    assert objective(w, out.a, out.b, grams) == pytest.approx(hist[0], rel=1e-9)


def test_plain_start_original_inputs_reaches_whitened_optimum():
    w, x, _ = _problem(seed=5)
    stats = LinearStats(x @ x.T, x.shape[1])
    grams = PairedGrams.original(stats.gram)
    a0, b0, _ = truncated_svd(w, 4)
    _, _, hist = alternate(w, a0, b0, grams, 40)
    opt = objective(w, *whitened_truncate(w, stats.whitening(), 4)[:2], grams)
    assert hist[-1] < hist[0] and hist[-1] == pytest.approx(opt, rel=1e-3)


def test_refiner_is_monotone_and_records_history():
    w, x, xh = _problem(seed=6)
    stats = _stats(x, xh)
    grams = _grams(x, xh)
    given = Factorization(*whitened_truncate(w, stats.whitening(), 4)[:2], info={"whitening": "cholesky"})
    for ref in (AdaCompRefiner(iters=5), AdaCompRefiner(iters=0), AdaCompRefiner(iters=3, init="plain")):
        out = ref.refine(w, given, stats)
        assert out.rank == given.rank and out.param_count() == given.param_count()
        assert objective(w, out.a, out.b, grams) <= objective(w, given.a, given.b, grams) * (1 + 1e-12)
        hist = out.info["adacomp_history"]
        assert isinstance(hist, list) and len(hist) == ref.iters + 1 and out.info["whitening"] == "cholesky"
    # init=plain in original mode starts worse than the given whitened optimum: the input is returned.
    out = AdaCompRefiner(iters=2, init="plain", inputs="original").refine(w, given, stats)
    assert out.info["adacomp_returned"] == "input"


def test_balance_keeps_product_and_equalises_factor_norms():
    g = torch.Generator().manual_seed(7)
    a, b = 100 * torch.randn(8, 3, generator=g, dtype=F64), 0.01 * torch.randn(3, 6, generator=g, dtype=F64)
    a2, b2, s = balance(a, b)
    torch.testing.assert_close(a2 @ b2, a @ b)
    torch.testing.assert_close(a2.norm(dim=0), b2.norm(dim=1))
    assert torch.all(s[:-1] >= s[1:])


def test_stacked_grams_are_used_and_required():
    w, x, xh = _problem(seed=8)
    stats = _stats(x, xh)
    with pytest.raises(ValueError, match="stacked Grams"):
        AdaCompRefiner(stack_of_batch=4).refine(w, Factorization(*truncated_svd(w, 3)[:2]), stats)
    xs, xhs = x[:, :50], xh[:, :50]  # stand-ins for averaged samples
    stats.gram_stacked, stats.gram_hat_stacked, stats.cross_stacked = xs @ xs.T, xhs @ xhs.T, xs @ xhs.T
    ref = AdaCompRefiner(stack_of_batch=4, iters=20)
    assert ref.needs_compressed_inputs and AdaCompRefiner(stack_of_batch=4, inputs="original").needs_compressed_inputs
    assert ref.grams(stats).gram_hat is stats.gram_hat_stacked
    out = ref.refine(w, Factorization(*truncated_svd(w, 3)[:2]), stats)
    assert out.info["adacomp_history"][-1] < out.info["adacomp_history"][0]


@pytest.mark.parametrize("bad", [{"init": "svd"}, {"inputs": "prefix"}, {"iters": -1}, {"stack_of_batch": 1}])
def test_adacomp_rejects_bad_options(bad):
    with pytest.raises(ValueError):
        AdaCompRefiner(**bad)


def _ctx(block_cosine: list[float], shapes: list[tuple[str, int, int]]) -> AllocationContext:
    mods = [ModuleInfo(f"model.layers.{b}.{kind}", b, kind, m, n)
            for b in range(len(block_cosine)) for kind, m, n in shapes]
    return AllocationContext(mods, len(block_cosine), block_cosine)


LLAMA_SHAPES = [("self_attn.q_proj", 4096, 4096), ("self_attn.k_proj", 4096, 4096), ("self_attn.v_proj", 4096, 4096),
                ("self_attn.o_proj", 4096, 4096), ("mlp.gate_proj", 11008, 4096), ("mlp.up_proj", 11008, 4096),
                ("mlp.down_proj", 4096, 11008)]


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("alloc", [AdaCRAllocator(), AdaCRAllocator(mrr_delta=0.4, min_keep=0.3, max_keep=0.85),
                                   AdaCRAllocator(mrr=0.0, max_keep=0.9)])
def test_adacr_weighted_mean_equals_target_and_bounds(ratio, alloc):
    g = torch.Generator().manual_seed(9)
    cos = (0.6 + 0.39 * torch.rand(32, generator=g)).tolist()
    cos[0], cos[-1] = 0.1, 0.3  # first/last blocks change the hidden state most
    ctx = _ctx(cos, LLAMA_SHAPES)
    if not alloc.min_keep <= 1 - ratio <= alloc.max_keep:
        pytest.skip("target outside the clip bounds")
    keeps = alloc.allocate(ctx, ratio)
    total = sum(mod.params for mod in ctx.modules)
    mean = sum(keeps[mod.name] * mod.params for mod in ctx.modules) / total
    assert mean == pytest.approx(1 - ratio, rel=1e-9)
    assert all(alloc.min_keep - 1e-12 <= k <= alloc.max_keep + 1e-12 for k in keeps.values())
    # Realised storage after flooring ranks (dense when factoring would not save) within 0.5 %.
    stored = 0
    for mod in ctx.modules:
        k = rank_for(mod.out_features, mod.in_features, keeps[mod.name])
        stored += mod.params if k is None else k * (mod.out_features + mod.in_features)
    assert stored / total == pytest.approx(1 - ratio, rel=5e-3)
    per_block = alloc.block_keeps(ctx, ratio)
    assert per_block[0] >= max(per_block[1:-1]) - 1e-12  # lowest cosine -> most important -> keeps most


def test_adacr_unequal_blocks_and_saturation_renormalise():
    imp = [3.0, 1.0, 0.5, 0.5, 0.0]
    weights = [1.0, 2.0, 3.0, 1.0, 5.0]
    keeps = budgeted_keeps(imp, weights, trr=0.5, mrr=0.2, lo=0.1, hi=0.8)
    assert keeps[0] == pytest.approx(0.8)  # saturated at the upper bound
    assert sum(w * k for w, k in zip(weights, keeps, strict=True)) / sum(weights) == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="outside the clip bounds"):
        budgeted_keeps(imp, weights, trr=0.9, mrr=0.2, lo=0.1, hi=0.8)


def test_block_importance_sign_and_normalisation():
    imp = block_importance([0.2, 0.9, 0.8], "dissimilarity")
    assert sum(imp) / 3 == pytest.approx(1.0) and imp[0] > imp[2] > imp[1]
    sim = block_importance([0.2, 0.9, 0.8], "similarity")
    assert sim[1] > sim[2] > sim[0]
    assert block_importance([1.0, 1.0], "dissimilarity") == [1.0, 1.0]  # degenerate -> uniform


def test_registry_compositions():
    m = parse_method("adasvd")
    cfg = m.config()
    assert (cfg["allocator"]["name"], cfg["factorizer"]["name"], cfg["refiner"]["name"]) == ("adacr", "whitened", "adacomp")
    assert cfg["refiner"]["inputs"] == "compressed" and m.needs_compressed_inputs
    assert parse_method("svd-llm+adacomp").config()["allocator"]["name"] == "uniform"
    assert not parse_method("svd-llm+adacr").needs_compressed_inputs
    assert not parse_method("adasvd+none").needs_compressed_inputs
    assert parse_method("adasvd+uniform").config()["allocator"]["name"] == "uniform"
    opt = parse_method("svd-llm+adacomp[adacomp.iters=3,adacomp.inputs=original,adacomp.init=plain]")
    assert opt.refiner.iters == 3 and not opt.needs_compressed_inputs
    assert parse_method("adasvd[adacr.mrr_delta=0.05]").allocator.mrr_delta == 0.05
