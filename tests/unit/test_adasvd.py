"""AdaSVD: adaComp alternating least squares, adaCR allocation, registry (random tensors, CPU)."""

from __future__ import annotations

import pytest
import torch

from harness.engine.statistics import CalibrationStatistics
from methods import AllocationContext, LinearStats, ModuleInfo, parse_method, rank_for
from methods._linalg import truncated_svd, whitened_truncate, whitening
from methods.adacomp import (
    AdaCompRefiner,
    PairedGrams,
    alternate,
    balance,
    objective,
    output_energy_ratio,
    reduced_rank_optimum,
    u_step,
    v_step,
    v_step_same,
)
from methods.adacr import AdaCRAllocator, block_importance, budgeted_keeps
from methods.describe import option_descriptions
from methods.lowrank import Factorization
from methods.stack_of_batch import StackedGrams, paper_mini_bsz
from methods.statistics import GramProduct, for_samples

F64 = torch.float64


def _paired(component) -> bool:
    """True when the component declares a statistic of the compressed model's inputs."""
    return any(stat.stream == "paired" for stat in component.statistics())


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


def _dense_stats(x: torch.Tensor) -> LinearStats:
    return LinearStats(x @ x.T, x.shape[1])


def _loss(w: torch.Tensor, approx: torch.Tensor, x_fit: torch.Tensor, target: torch.Tensor) -> float:
    """The adaComp objective on materialised activations: ``||W' X_fit - target||_F^2``."""
    return float(((approx @ x_fit - target) ** 2).sum())


@pytest.mark.parametrize("target", ["same", "dense"])
def test_objective_matches_materialised_activations(target):
    w, x, xh = _problem()
    a, b, _ = truncated_svd(w, 4)
    grams = PairedGrams.same(xh @ xh.T) if target == "same" else _grams(x, xh)
    direct = _loss(w, a @ b, xh, w @ (xh if target == "same" else x))
    assert objective(w, a, b, grams) == pytest.approx(direct, rel=1e-10)
    ref = AdaCompRefiner(target=target)
    assert ref.grams(_stats(x, xh)).same_target == (target == "same")


def test_u_step_matches_direct_least_squares():
    w, x, xh = _problem(seed=1)
    grams = _grams(x, xh)
    _, b, _ = truncated_svd(w, 4)
    a = u_step(w @ grams.cross, b, grams.gram_hat)
    # min_A ||A (B Xh) - W X||_F  <=>  (B Xh)^T A^T = (W X)^T in the least-squares sense (Eq. (8)-(10)).
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


@pytest.mark.parametrize("tokens", [200, 6])
def test_paper_v_step_is_the_exact_minimiser_for_the_same_target(tokens):
    """Eq. (13), B = A^+ W, minimises ||(A B - W) Xh|| for any Xh, even rank-deficient (6 tokens, n = 10)."""
    w, _, xh = _problem(tokens=tokens, seed=3)
    a, _, _ = truncated_svd(w, 4)
    b = v_step_same(w, a)
    torch.testing.assert_close(b, torch.linalg.pinv(a) @ w, rtol=1e-8, atol=1e-10)
    best = _loss(w, a @ b, xh, w @ xh)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        other = b + 1e-2 * torch.randn(*b.shape, generator=g, dtype=F64)
        assert best <= _loss(w, a @ other, xh, w @ xh) * (1 + 1e-12)
    if tokens > xh.shape[0]:  # full-rank inputs: the data-weighted V-step gives the same factor
        hh = xh @ xh.T
        torch.testing.assert_close(v_step(w @ hh, a, whitening(hh)), b, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("target", ["same", "dense"])
@pytest.mark.parametrize("init", ["plain", "whitened"])
def test_objective_never_increases_on_compressed_inputs(init, target):
    w, x, xh = _problem(seed=3)
    grams = PairedGrams.same(xh @ xh.T) if target == "same" else _grams(x, xh)
    k = 4
    a0, b0, _ = truncated_svd(w, k) if init == "plain" else whitened_truncate(w, whitening(x @ x.T), k)
    a, b, hist = alternate(w, a0, b0, grams, 30)
    assert all(h1 <= h0 * (1 + 1e-12) for h0, h1 in zip(hist, hist[1:], strict=False))
    assert hist[-1] < hist[0]  # the dense-input start is not optimal for Xh: adaComp must gain
    # ... and it can never beat the reduced-rank-regression optimum, which it approaches.
    best = objective(w, *reduced_rank_optimum(w, grams, k), grams)
    assert best * (1 - 1e-9) <= min(hist) <= best * 1.02
    assert objective(w, a, b, grams) == pytest.approx(min(hist), rel=1e-12)


def test_same_target_optimum_is_whitened_truncation_of_the_fitted_inputs():
    """target=same: L = ||(W' - W) Xh||^2, whose rank-k optimum is SVD-LLM's truncation with Hh."""
    w, _, xh = _problem(seed=4)
    hh = xh @ xh.T
    a, b = reduced_rank_optimum(w, PairedGrams.same(hh), 4)
    a2, b2, s = whitened_truncate(w, whitening(hh), 4)
    torch.testing.assert_close(a @ b, a2 @ b2, rtol=1e-8, atol=1e-10)
    assert objective(w, a, b, PairedGrams.same(hh)) == pytest.approx(float((s[4:] ** 2).sum()), rel=1e-9)


def test_trap_dense_inputs_whitened_start_cannot_lower_the_loss():
    """inputs=dense: the whitened truncation is the global optimum of the objective; nothing to gain."""
    w, x, _ = _problem(seed=4)
    stats = _dense_stats(x)
    k = 4
    a0, b0, s = whitened_truncate(w, stats.whitening(), k)
    grams = PairedGrams.same(stats.gram)
    _, _, hist = alternate(w, a0, b0, grams, 10, white_hat=stats.whitening())
    assert hist[0] == pytest.approx(float((s[k:] ** 2).sum()), rel=1e-9)
    assert max(abs(h - hist[0]) for h in hist) <= 1e-9 * hist[0]
    ref = AdaCompRefiner(iters=10, inputs="dense")
    assert not _paired(ref)
    out = ref.refine(w, Factorization(a0, b0), stats)
    assert objective(w, out.a, out.b, grams) == pytest.approx(hist[0], rel=1e-9)


def test_plain_start_on_dense_inputs_converges_to_the_whitened_error():
    w, x, _ = _problem(seed=5)
    stats = _dense_stats(x)
    grams = PairedGrams.same(stats.gram)
    plain = Factorization(*truncated_svd(w, 4)[:2])
    out = AdaCompRefiner(iters=60, inputs="dense").refine(w, plain, stats)
    opt = objective(w, *whitened_truncate(w, stats.whitening(), 4)[:2], grams)
    assert objective(w, plain.a, plain.b, grams) > 1.5 * opt  # the start is far from the optimum ...
    assert objective(w, out.a, out.b, grams) == pytest.approx(opt, rel=1e-3)  # ... and adaComp reaches it
    hist = out.info["adacomp_history"]
    assert len(hist) == 61 and hist[-1] < hist[0]


def test_dense_target_on_dense_inputs_equals_the_same_target():
    """With Xh = X the cross Gram is H: target=dense and target=same are one objective and one refit."""
    w, x, _ = _problem(seed=6)
    stats = _stats(x, x)
    given = Factorization(*truncated_svd(w, 4)[:2])
    outs = [AdaCompRefiner(iters=3, target=t).refine(w, given, stats) for t in ("same", "dense")]
    torch.testing.assert_close(outs[0].dense(), outs[1].dense(), rtol=1e-7, atol=1e-9)
    assert outs[0].info["adacomp_history"] == pytest.approx(outs[1].info["adacomp_history"], rel=1e-6)


def test_default_is_the_papers_configuration():
    """One iteration (Table 3(c)), compressed-prefix inputs, target W Xh (Eq. (4)): only gram_hat is needed."""
    ref = AdaCompRefiner()
    assert (ref.iters, ref.inputs, ref.target, ref.init, ref.stack_of_batch) == (1, "compressed", "same", "factorizer", 0)
    assert _paired(ref)
    w, x, xh = _problem(seed=7)
    stats = LinearStats(x @ x.T, x.shape[1], gram_hat=xh @ xh.T)  # no cross Gram
    given = Factorization(*whitened_truncate(w, stats.whitening(), 4)[:2])
    out = ref.refine(w, given, stats)
    grams = PairedGrams.same(xh @ xh.T)
    assert objective(w, out.a, out.b, grams) < objective(w, given.a, given.b, grams)
    assert len(out.info["adacomp_history"]) == 2
    with pytest.raises(ValueError, match="cross"):
        AdaCompRefiner(target="dense").refine(w, given, stats)


def test_dense_target_shrinks_the_output_and_norm_restores_it():
    """Least squares of W X on noisy regressors Xh attenuates the output; shrinkage=norm rescales it."""
    w, x, xh = _problem(seed=8, noise=0.6)
    stats = _stats(x, xh)
    given = Factorization(*whitened_truncate(w, stats.whitening(), 6)[:2])
    grams = _grams(x, xh)
    plain = AdaCompRefiner(iters=5, target="dense").refine(w, given, stats)
    fixed = AdaCompRefiner(iters=5, target="dense", shrinkage="norm").refine(w, given, stats)
    assert plain.info["adacomp_output_ratio"] < 0.95
    assert output_energy_ratio(w, fixed.a, fixed.b, grams) == pytest.approx(1.0, rel=1e-9)
    torch.testing.assert_close(fixed.dense(), plain.dense() / plain.info["adacomp_output_ratio"], rtol=1e-4, atol=1e-8)


def test_refiner_is_monotone_and_records_history():
    w, x, xh = _problem(seed=6)
    stats = _stats(x, xh)
    given = Factorization(*whitened_truncate(w, stats.whitening(), 4)[:2], info={"whitening": "cholesky"})
    for ref in (AdaCompRefiner(iters=5), AdaCompRefiner(iters=0), AdaCompRefiner(iters=3, init="plain"),
                AdaCompRefiner(iters=4, target="dense")):
        grams = ref.grams(stats)
        out = ref.refine(w, given, stats)
        assert out.rank == given.rank and out.param_count() == given.param_count()
        assert objective(w, out.a, out.b, grams) <= objective(w, given.a, given.b, grams) * (1 + 1e-12)
        hist = out.info["adacomp_history"]
        assert isinstance(hist, list) and len(hist) == ref.iters + 1 and out.info["whitening"] == "cholesky"
    # init=plain on dense inputs starts worse than the given whitened optimum: the input is returned.
    out = AdaCompRefiner(iters=2, init="plain", inputs="dense").refine(w, given, stats)
    assert out.info["adacomp_returned"] == "input"


def test_balance_keeps_product_and_equalises_factor_norms():
    g = torch.Generator().manual_seed(7)
    a, b = 100 * torch.randn(8, 3, generator=g, dtype=F64), 0.01 * torch.randn(3, 6, generator=g, dtype=F64)
    a2, b2, s = balance(a, b)
    torch.testing.assert_close(a2 @ b2, a @ b)
    torch.testing.assert_close(a2.norm(dim=0), b2.norm(dim=1))
    assert torch.all(s[:-1] >= s[1:])


@pytest.mark.parametrize("target", ["same", "dense"])
def test_stacked_grams_are_used_and_required(target):
    w, x, xh = _problem(seed=8)
    stats = _stats(x, xh)
    with pytest.raises(ValueError, match="stacked Grams"):
        AdaCompRefiner(stack_of_batch=4, target=target).refine(w, Factorization(*truncated_svd(w, 3)[:2]), stats)
    xs, xhs = x[:, :50], xh[:, :50]  # stand-ins for averaged samples
    stats.gram_stacked, stats.gram_hat_stacked, stats.cross_stacked = xs @ xs.T, xhs @ xhs.T, xs @ xhs.T
    ref = AdaCompRefiner(stack_of_batch=4, iters=20, target=target)
    assert _paired(ref) and _paired(AdaCompRefiner(stack_of_batch=4, inputs="dense"))
    assert ref.grams(stats).gram_hat is stats.gram_hat_stacked
    out = ref.refine(w, Factorization(*truncated_svd(w, 3)[:2]), stats)
    assert out.info["adacomp_history"][-1] < out.info["adacomp_history"][0]


@pytest.mark.parametrize("bad", [{"init": "svd"}, {"inputs": "original"}, {"target": "x"}, {"shrinkage": "ridge"},
                                 {"iters": -1}, {"iters": 1.5}, {"stack_of_batch": 1}])
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


def test_adacr_unclipped_keeps_follow_eq_20_with_the_papers_band():
    """CR_l = mrr + I_n(l) (trr - mrr) with trr - mrr = 0.1 (Table 3(d)) when no block saturates."""
    cos = [0.55, 0.9, 0.92, 0.95, 0.93, 0.8]
    ctx = _ctx(cos, LLAMA_SHAPES)
    alloc = AdaCRAllocator()
    assert alloc.mrr_delta == 0.1 and alloc.max_keep == 1.0
    keeps = alloc.block_keeps(ctx, 0.4)
    imp = block_importance(cos)
    expected = [0.5 + i * 0.1 for i in imp]
    assert max(expected) < 1.0
    assert keeps == pytest.approx(expected, abs=1e-12)


def test_adacr_block_past_break_even_stays_dense_or_is_capped_below_it():
    """A block whose CR reaches 1 stays dense (default); max_keep=0.99 factors it at a rank that still saves."""
    cos = [0.05] + [0.97] * 15  # block 0 changes the hidden state far more than the rest (I_n ~ 9.6)
    ctx = _ctx(cos, LLAMA_SHAPES)
    total = sum(mod.params for mod in ctx.modules)
    for alloc, dense_block0 in ((AdaCRAllocator(), True), (AdaCRAllocator(max_keep=0.99), False)):
        keeps = alloc.allocate(ctx, 0.2)
        ranks = {mod.name: rank_for(mod.out_features, mod.in_features, keeps[mod.name]) for mod in ctx.modules}
        block0 = [ranks[mod.name] for mod in ctx.modules if mod.block == 0]
        assert all(k is None for k in block0) if dense_block0 else all(k is not None for k in block0)
        assert all(ranks[mod.name] is not None for mod in ctx.modules if mod.block > 0)
        assert keeps[ctx.modules[0].name] == pytest.approx(alloc.max_keep)
        mean = sum(keeps[mod.name] * mod.params for mod in ctx.modules) / total
        assert mean == pytest.approx(0.8, rel=1e-9)


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
    assert (cfg["refiner"]["inputs"], cfg["refiner"]["target"], cfg["refiner"]["iters"]) == ("compressed", "same", 1)
    assert m.needs_compressed_inputs
    assert parse_method("svd-llm+adacomp").config()["allocator"]["name"] == "uniform"
    assert not parse_method("svd-llm+adacr").needs_compressed_inputs
    assert not parse_method("adasvd+none").needs_compressed_inputs
    assert parse_method("adasvd+uniform").config()["allocator"]["name"] == "uniform"
    assert parse_method("adasvd[refiner.target=dense]").refiner.target == "dense"
    opt = parse_method("svd-llm+adacomp[adacomp.iters=3,adacomp.inputs=dense,adacomp.init=plain,adacomp.shrinkage=norm]")
    assert (opt.refiner.iters, opt.refiner.shrinkage) == (3, "norm") and not opt.needs_compressed_inputs
    assert parse_method("adasvd[adacr.mrr_delta=0.05,adacr.max_keep=0.99]").allocator.max_keep == 0.99


# -- stack-of-batch by the paper's rule: mini_bsz = ceil(N / M), M = 32 ------------------------------

def test_paper_rule_is_off_up_to_32_samples_and_8_at_256():
    assert [paper_mini_bsz(n) for n in (1, 16, 32)] == [1, 1, 1]
    assert [paper_mini_bsz(n) for n in (33, 64, 128, 256, 257)] == [2, 2, 4, 8, 9]
    with pytest.raises(ValueError):
        paper_mini_bsz(0)
    stat = StackedGrams("paper", paired=True)
    assert stat.for_samples(32) is None  # off: nothing to collect
    assert stat.for_samples(256) == StackedGrams(8, paired=True)  # same key (and cache) as an explicit 8
    assert StackedGrams(4).for_samples(256) == StackedGrams(4)  # a fixed mini_bsz ignores N
    with pytest.raises(RuntimeError, match="for_samples"):
        stat.accumulator(3, torch.device("cpu"), GramProduct())


def test_paper_rule_resolves_in_the_engine_with_n_known():
    method = parse_method("adasvd[adacomp.stack_of_batch=paper]")
    assert method.refiner.stack_of_batch == "paper" and method.needs_compressed_inputs
    declared = method.statistics()
    assert "stacked-grams[mini_bsz=paper,seed=0,paired=1]" in [s.key for s in declared]

    def resolved(n: int) -> list[str]:
        ids = torch.zeros(n, 4, dtype=torch.long)  # only N is read
        source = CalibrationStatistics(None, None, lambda: [], torch.device("cpu"), None, {}, windows=(ids, None))
        return [s.key for s in source.resolve(declared)]

    assert not any(k.startswith("stacked-grams") for k in resolved(32))
    assert "stacked-grams[mini_bsz=8,seed=0,paired=1]" in resolved(256)
    assert [s.key for s in for_samples(declared, 256)] == resolved(256)
    # N is only counted when a rule needs it: a fixed mini_bsz never captures the block inputs.
    assert StackedGrams("paper").depends_on_samples and not StackedGrams(4).depends_on_samples

    def no_batches():
        raise AssertionError("N was counted although nothing depends on it")

    blind = CalibrationStatistics(None, None, no_batches, torch.device("cpu"), None, {})
    fixed = parse_method("adasvd[adacomp.stack_of_batch=4]").statistics()
    assert blind.resolve(fixed) == fixed
    # The default stays off whatever N (unchanged until it is measured), and its config is unchanged.
    assert AdaCompRefiner().stack_of_batch == 0
    assert parse_method("adasvd").config()["refiner"]["stack_of_batch"] == 0


@pytest.mark.parametrize("target", ["same", "dense"])
def test_paper_rule_fits_stacked_grams_when_collected_and_plain_ones_when_off(target):
    w, x, xh = _problem(seed=9)
    start = Factorization(*truncated_svd(w, 3)[:2])
    paper = AdaCompRefiner(stack_of_batch="paper", target=target, iters=3)
    # N <= 32: the rule resolved to 1, nothing stacked was collected: exactly the unstacked refiner.
    off = paper.refine(w, start, _stats(x, xh))
    plain = AdaCompRefiner(target=target, iters=3).refine(w, start, _stats(x, xh))
    assert torch.equal(off.a, plain.a) and torch.equal(off.b, plain.b)
    # N > 32: the engine collected the stacked Grams; the rule fits them like a fixed mini_bsz.
    stats = _stats(x, xh)
    xs, xhs = x[:, :50], xh[:, :50]
    stats.gram_stacked, stats.gram_hat_stacked, stats.cross_stacked = xs @ xs.T, xhs @ xhs.T, xs @ xhs.T
    assert paper.grams(stats).gram_hat is stats.gram_hat_stacked
    stacked = paper.refine(w, start, stats)
    fixed = AdaCompRefiner(stack_of_batch=8, target=target, iters=3).refine(w, start, stats)
    assert torch.equal(stacked.a, fixed.a) and torch.equal(stacked.b, fixed.b)


@pytest.mark.parametrize("bad", ["papers", "8", 1, -2, 2.5, True])
def test_stack_of_batch_accepts_only_off_paper_or_an_integer_from_2(bad):
    with pytest.raises(ValueError, match="stack_of_batch"):
        AdaCompRefiner(stack_of_batch=bad)
    assert AdaCompRefiner(stack_of_batch=2).stacks and not AdaCompRefiner().stacks
    assert "ceil(N / 32)" in option_descriptions(AdaCompRefiner)["stack_of_batch"]
