"""ResSVD on random tensors: the residual factorizer and the last-layers allocator (docs/methods/ressvd.md)."""

from __future__ import annotations

import math

import pytest
import torch

from methods import LinearStats, ModuleInfo, parse_method, rank_for
from methods._linalg import (
    lowrank_params,
    output_error,
    paired_output_error,
    truncated_svd,
    whitened_truncate,
    whitening,
)
from methods.components import AllocationContext, build_component
from methods.last_layers import (
    LastLayersAllocator,
    choose_n_compressed,
    plan_last_layers,
    smallest_n_compressed,
)
from methods.ressvd import ResidualFactorizer, compressed_residual


def _paired(component) -> bool:
    """True when the component declares a statistic of the compressed model's inputs."""
    return any(stat.stream == "paired" for stat in component.statistics())


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _problem(seed: int = 0, m: int = 24, n: int = 32, tokens: int = 400, noise: float = 0.3):
    """W, dense inputs X and token-aligned compressed-prefix inputs Xh (both (tokens, n)), LLM-like outliers."""
    g = _gen(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    x[:, :2] *= 20.0
    # The compressed prefix distorts the inputs: a mixing of the channels plus token noise.
    mix = torch.eye(n, dtype=torch.float64) + noise * torch.randn(n, n, generator=g, dtype=torch.float64) / n**0.5
    xh = x @ mix + noise * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    return w, x, xh


def _stats(x: torch.Tensor, xh: torch.Tensor | None = None) -> LinearStats:
    if xh is None:
        return LinearStats(x.T @ x, x.shape[0])
    return LinearStats(x.T @ x, x.shape[0], xh.T @ xh, x.T @ xh)  # cross = sum x xh^T


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-9) -> bool:
    return float((a - b).norm() / b.norm()) < tol


# -- the trap: the same metric in both stages is plain rank-r truncation ---------------------------


@pytest.mark.parametrize("split", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_same_metric_whitened_equals_whitened_truncation_at_rank_r(split):
    w, x, _ = _problem(1)
    stats = _stats(x)
    r = 10
    fact = ResidualFactorizer(split=split, stage1="whitened", stage2="same").factorize(w, stats, r)
    a, b, _ = whitened_truncate(w, whitening(stats.gram), r)
    assert _close(fact.dense(), a @ b)


@pytest.mark.parametrize("stage2", ["plain", "same"])
@pytest.mark.parametrize("split", [0.3, 0.5, 0.7])
def test_plain_plus_plain_equals_truncated_svd_at_rank_r(stage2, split):
    w, x, _ = _problem(2)
    r = 9
    fact = ResidualFactorizer(split=split, stage1="plain", stage2=stage2).factorize(w, _stats(x), r)
    a, b, _ = truncated_svd(w, r)
    assert _close(fact.dense(), a @ b)


def test_compressed_stage2_with_undistorted_inputs_is_the_trap_too():
    """With Xh = X (the first compressed block sees dense inputs), C = Hh = H: the same metric."""
    w, x, _ = _problem(3)
    r = 8
    fact = ResidualFactorizer(split=0.5, stage2="compressed").factorize(w, _stats(x, x), r)
    a, b, _ = whitened_truncate(w, whitening(x.T @ x), r)
    assert _close(fact.dense(), a @ b, 1e-8)


def test_whitened_then_plain_differs_and_trades_output_error_for_weight_error():
    w, x, _ = _problem(4)
    h, r = x.T @ x, 10
    res = ResidualFactorizer(split=0.5, stage1="whitened", stage2="plain").factorize(w, _stats(x), r).dense()
    a, b, _ = whitened_truncate(w, whitening(h), r)
    ref = a @ b
    assert not _close(res, ref, 1e-3)
    # Whitened truncation is the optimum of the dense-input objective; the residual cannot beat it,
    # but its rank-r2 part is the weight-space optimum of the residual, so the weight error drops.
    assert output_error(w, res, h) >= output_error(w, ref, h) * (1 - 1e-12)
    assert (w - res).norm() <= (w - ref).norm() * (1 + 1e-12)


# -- compressed-prefix stage 2: the reduced-rank regression, checked on materialised activations ----


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_compressed_residual_matches_materialised_reduced_rank_regression(seed):
    w, x, xh = _problem(seed + 10)
    h, r1, r2 = x.T @ x, 6, 5
    a1, b1, _ = whitened_truncate(w, whitening(h), r1)
    w1 = a1 @ b1
    a2, b2, _ = compressed_residual(w, w1, xh.T @ xh, x.T @ xh, r2)
    r2_gram = a2 @ b2
    assert a2.shape == (w.shape[0], r2) and b2.shape == (r2, w.shape[1])

    # Independent solution from the tokens themselves: Xh^T = Q R, R2 R^T = trunc(E Q).
    e = w @ x.T - w1 @ xh.T
    q, rr = torch.linalg.qr(xh)  # xh = Q R  ->  Xh = R^T Q^T
    u, s, vh = torch.linalg.svd(e @ q, full_matrices=False)
    trunc = (u[:, :r2] * s[:r2]) @ vh[:r2]
    r2_tok = torch.linalg.solve(rr, trunc.T).T  # trunc R^{-T}
    assert _close(r2_gram, r2_tok, 1e-8)

    def objective(corr: torch.Tensor) -> float:
        return float(((w1 + corr) @ xh.T - w @ x.T).norm())

    best = objective(r2_gram)
    # The Gram formula of the error agrees with the materialised one...
    assert paired_output_error(w, w1 + r2_gram, h, xh.T @ xh, x.T @ xh) == pytest.approx(best, rel=1e-8)
    # ...and no other rank-r2 correction does better: the plain and whitened residual fits, and
    # random rank-r2 perturbations of the optimum.
    pa, pb, _ = truncated_svd(w - w1, r2)
    wa, wb, _ = whitened_truncate(w - w1, whitening(h), r2)
    assert best <= objective(pa @ pb) and best <= objective(wa @ wb)
    g = _gen(seed)
    for _ in range(5):
        da = 1e-3 * torch.randn(*a2.shape, generator=g, dtype=torch.float64)
        db = 1e-3 * torch.randn(*b2.shape, generator=g, dtype=torch.float64)
        assert best <= objective((a2 + da) @ (b2 + db)) * (1 + 1e-12)


def test_compressed_split_interpolates_between_global_fit_and_svd_llm():
    """split=0 is the global rank-r optimum of ||W' Xh - W X||; split=1 is SVD-LLM; any split lies between."""
    w, x, xh = _problem(5, noise=0.5)
    stats, r = _stats(x, xh), 10

    def paired(split: float) -> float:
        approx = ResidualFactorizer(split=split, stage2="compressed").factorize(w, stats, r).dense()
        return paired_output_error(w, approx, stats.gram, stats.gram_hat, stats.cross)

    a, b, _ = whitened_truncate(w, whitening(stats.gram), r)
    svd_llm = paired_output_error(w, a @ b, stats.gram, stats.gram_hat, stats.cross)
    assert paired(1.0) == pytest.approx(svd_llm, rel=1e-9)
    for split in (0.25, 0.5, 0.75):
        assert paired(0.0) <= paired(split) * (1 + 1e-12)
        assert paired(split) <= svd_llm * (1 + 1e-12)
    assert paired(0.5) < 0.99 * svd_llm  # a real gain on distorted inputs, not a tie


def test_compressed_stage2_without_paired_statistics_is_a_clear_error():
    w, x, _ = _problem(6)
    with pytest.raises(ValueError, match="compressed-prefix statistics"):
        ResidualFactorizer(split=0.5, stage2="compressed").factorize(w, _stats(x), 6)


def test_eigen_fallback_of_compressed_gram_gives_finite_factors():
    w, x, _ = _problem(7, n=32, tokens=400)
    xh = x[:20].repeat(20, 1)  # rank-20 compressed inputs: Hh singular
    fact = ResidualFactorizer(split=0.5, stage2="compressed").factorize(w, _stats(x, xh), 8)
    assert torch.isfinite(fact.dense()).all()
    assert fact.info["whitening_hat"] == "eigen"


# -- storage and options ----------------------------------------------------------------------------


@pytest.mark.parametrize("stage1,stage2", [("whitened", "compressed"), ("whitened", "plain"), ("whitened", "same"),
                                           ("plain", "whitened"), ("plain", "compressed")])
@pytest.mark.parametrize("split", [0.0, 0.5, 1.0])
def test_stored_parameters_equal_rank_r_svd(stage1, stage2, split):
    w, x, xh = _problem(8, m=20, n=36)
    r = 7
    fact = ResidualFactorizer(split=split, stage1=stage1, stage2=stage2).factorize(w, _stats(x, xh), r)
    a, b, _ = truncated_svd(w, r)
    assert fact.rank == r and fact.a.shape == a.shape and fact.b.shape == b.shape
    assert fact.param_count() == lowrank_params(20, 36, r) == a.numel() + b.numel()
    assert fact.info["r1"] + fact.info["r2"] == r
    module = fact.to_module(None, torch.float32, "cpu")
    assert sum(p.numel() for p in module.parameters()) == r * (20 + 36)


def test_split_rounding_and_declared_statistics():
    f = ResidualFactorizer(split=0.5)
    assert f.split_ranks(7, 20, 30) == (4, 3) and f.split_ranks(1, 20, 30) == (1, 0)
    assert ResidualFactorizer(split=0.0).split_ranks(5, 20, 30) == (0, 5)
    assert not _paired(ResidualFactorizer()) and not _paired(f)
    assert _paired(ResidualFactorizer(stage2="compressed"))
    assert not _paired(ResidualFactorizer(stage2="same"))


@pytest.mark.parametrize("m,n,rank,r2", [(4096, 4096, 1228, 102), (11008, 4096, 900, 149), (64, 160, 20, 2),
                                         (64, 64, 1, 0), (64, 64, 2, 1)])
def test_default_split_is_ercsvd_beta_of_the_break_even_rank(m, n, rank, r2):
    """r2 = floor(0.05 m n / (m + n)) (ERC-SVD), r1 = r - r2, and stage 1 keeps at least one rank."""
    f = ResidualFactorizer()
    assert f.beta == 0.05 and f.split is None
    assert f.split_ranks(rank, m, n) == (rank - r2, r2)


def test_default_factorizer_is_whitened_stage1_plus_plain_residual():
    """The paper's reading: W1 = whitened rank-r1 truncation, R2 = weight-space rank-r2 truncation of W - W1."""
    w, x, _ = _problem(9, m=40, n=60)
    stats, r = _stats(x), 12
    fact = ResidualFactorizer().factorize(w, stats, r)
    r1, r2 = fact.info["r1"], fact.info["r2"]
    assert (r1, r2) == (11, 1) and fact.info["stage2"] == "plain"
    a1, b1, _ = whitened_truncate(w, whitening(stats.gram), r1)
    a2, b2, _ = truncated_svd(w - a1 @ b1, r2)
    assert _close(fact.dense(), a1 @ b1 + a2 @ b2)
    a, b, _ = whitened_truncate(w, whitening(stats.gram), r)
    assert (w - fact.dense()).norm() < (w - a @ b).norm()  # smaller weight-space truncation loss than SVD-LLM


@pytest.mark.parametrize("opts", [{"split": 1.5}, {"beta": 1.0}, {"stage1": "compressed"}, {"stage2": "fisher"}])
def test_bad_residual_options_are_rejected(opts):
    with pytest.raises(ValueError, match="residual"):
        build_component("factorizer", "residual", opts)


def test_method_compositions():
    m = parse_method("ressvd")
    assert (m.allocator.name, m.factorizer.name, m.refiner.name) == ("last-layers", "residual", "none")
    assert not m.needs_compressed_inputs and m.factorizer.stage2 == "plain"
    assert parse_method("ressvd[residual.stage2=compressed]").needs_compressed_inputs
    assert parse_method("svd-llm+residual").allocator.name == "uniform"
    ll = parse_method("svd-llm+last-layers")
    assert (ll.allocator.name, ll.factorizer.name, ll.needs_compressed_inputs) == ("last-layers", "whitened", False)
    opt = parse_method("ressvd[residual.stage2=plain,last-layers.blocks=3,last-layers.cap=0.7]")
    assert opt.factorizer.stage2 == "plain" and opt.allocator.blocks == 3 and opt.allocator.cap == 0.7
    assert not opt.needs_compressed_inputs


# -- last-layers allocator --------------------------------------------------------------------------


def _llama_like(n_blocks: int, d: int = 64, ff: int = 160, widths: list[int] | None = None) -> list[ModuleInfo]:
    mods = []
    for i in range(n_blocks):
        dd = widths[i] if widths else d
        shapes = {"q": (dd, d), "k": (dd // 2, d), "v": (dd // 2, d), "o": (d, dd), "gate": (ff, d), "up": (ff, d),
                  "down": (d, ff)}
        mods += [ModuleInfo(f"b.{i}.{k}", i, k, m, n) for k, (m, n) in shapes.items()]
    return mods


def _achieved(mods: list[ModuleInfo], keeps: dict[str, float]) -> float:
    """Achieved ratio with the engine's accounting (rank_for: None = dense)."""
    kept = 0
    for mod in mods:
        k = rank_for(mod.out_features, mod.in_features, keeps[mod.name])
        kept += mod.params if k is None else lowrank_params(mod.out_features, mod.in_features, k)
    return 1.0 - kept / sum(m.params for m in mods)


@pytest.mark.parametrize("fraction", [0.8, 0.5, None])
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("widths", [None, [32, 48, 64, 96, 128, 64, 80, 112]])
def test_last_layers_budget_and_dense_prefix(ratio, widths, fraction):
    mods = _llama_like(8, widths=widths)
    plan = plan_last_layers(mods, 8, ratio, cap=0.8, fraction=fraction)
    keeps = LastLayersAllocator(fraction=fraction).allocate(AllocationContext(mods, 8), ratio)
    assert keeps == plan.keeps
    # The achieved ratio meets the request and exceeds it by less than one rank step of one module.
    total = sum(m.params for m in mods)
    step = max(m.out_features + m.in_features for m in mods if m.block >= plan.first_block)
    assert ratio - 1e-12 <= _achieved(mods, keeps) < ratio + step / total
    assert plan.target_removed <= plan.removed < plan.target_removed + step
    for mod in mods:
        if mod.block < plan.first_block:
            assert keeps[mod.name] == 1.0 and rank_for(mod.out_features, mod.in_features, 1.0) is None
        else:
            assert rank_for(mod.out_features, mod.in_features, keeps[mod.name]) == plan.ranks[mod.name]
    # The budget equation with heterogeneous blocks, and the L_c rule: ceil(fraction L) or the
    # smallest L_c under the cap, whichever is larger.
    block_params = [sum(m.params for m in mods if m.block == b) for b in range(8)]
    assert plan.block_removal == pytest.approx(ratio * total / sum(block_params[plan.first_block:]))
    assert plan.block_removal <= 0.8 + 1e-9
    smallest = smallest_n_compressed(block_params, ratio, 0.8)
    assert plan.n_compressed == (smallest if fraction is None else max(smallest, math.ceil(fraction * 8)))
    if smallest > 1:
        assert ratio * total / sum(block_params[8 - smallest + 1:]) > 0.8


def test_default_rule_compresses_the_last_80_percent_of_blocks_or_more():
    """fraction=0.8: 24 of 30 equal blocks at 0.2 (25 % removal each); the cap takes over at high ratios."""
    alloc = LastLayersAllocator()
    assert (alloc.blocks, alloc.fraction, alloc.cap) == (None, 0.8, 0.8)
    blocks = [10] * 30
    assert [choose_n_compressed(blocks, r, 0.8, 0.8) for r in (0.1, 0.2, 0.4, 0.6, 0.7, 0.8)] == [24, 24, 24, 24, 27, 30]
    counts = [choose_n_compressed(blocks, r / 100, 0.8, 0.8) for r in range(1, 81)]
    assert counts == sorted(counts)  # more compression never compresses fewer blocks
    mods = _llama_like(30)
    plan = plan_last_layers(mods, 30, 0.2, fraction=0.8)
    assert (plan.n_compressed, plan.first_block, plan.block_removal) == (24, 6, pytest.approx(0.25))


def test_equal_blocks_need_ratio_times_blocks_over_cap():
    assert smallest_n_compressed([10] * 8, 0.4, 0.8) == 4
    assert smallest_n_compressed([10] * 2, 0.4, 0.8) == 1  # 0.4 * 2 == 0.8 must not fail on float round-off
    assert smallest_n_compressed([10] * 10, 0.6, 0.8) == 8
    assert choose_n_compressed([10] * 10, 0.6, 0.8) == 8  # fraction=None: the smallest count alone
    assert choose_n_compressed([10] * 10, 0.2, 0.8, 1.0) == 10  # fraction=1: every block (uniform)


def test_given_number_of_blocks_is_used_and_checked():
    mods = _llama_like(6)
    plan = plan_last_layers(mods, 6, 0.3, n_compressed=5)
    assert plan.first_block == 1 and plan.block_removal == pytest.approx(0.3 * 6 / 5)
    with pytest.raises(ValueError, match="needs per-block removal .* > cap"):
        plan_last_layers(mods, 6, 0.3, n_compressed=2)
    with pytest.raises(ValueError, match=r"must lie in \[1, 6\]"):
        plan_last_layers(mods, 6, 0.3, n_compressed=7)


def test_ratio_the_cap_cannot_meet_is_a_clear_error():
    mods = _llama_like(4)
    with pytest.raises(ValueError, match="cannot be met with per-block removal cap 0.8"):
        LastLayersAllocator().allocate(AllocationContext(mods, 4), 0.85)
    with pytest.raises(ValueError, match="fraction must lie"):
        build_component("allocator", "last-layers", {"fraction": 0.0})
    with pytest.raises(ValueError, match="cap must lie"):
        build_component("allocator", "last-layers", {"cap": 1.0})


def test_keep_one_leaves_non_square_modules_dense():
    """The engine's rank_for: floor(m n / (m + n)) would still save parameters on a 160 x 64 matrix."""
    assert rank_for(160, 64, 1.0) is None and rank_for(64, 64, 1.0) is None


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.35, 0.5, 0.7])
@pytest.mark.parametrize("widths", [None, [32, 48, 64, 96, 128, 64, 80, 112], [128, 112, 96, 80, 64, 48, 40, 32]])
def test_fraction_none_is_the_smallest_count_the_cap_allows(ratio, widths):
    """The text-free rule: the smallest L_c whose compressed blocks each remove at most ``cap``, brute-forced
    over every L_c, with the overall ratio met and every earlier block dense."""
    cap, n = 0.8, 8
    mods = _llama_like(n, widths=widths)
    block_params = [sum(m.params for m in mods if m.block == b) for b in range(n)]
    total = sum(block_params)
    allowed = [lc for lc in range(1, n + 1) if ratio * total / sum(block_params[n - lc:]) <= cap + 1e-9]
    alloc = parse_method("ressvd[last-layers.fraction=None]").allocator
    assert alloc.fraction is None and parse_method("ressvd[last-layers.fraction=null]").allocator == alloc
    keeps = alloc.allocate(AllocationContext(mods, n), ratio)
    plan = plan_last_layers(mods, n, ratio, cap=cap, fraction=None)
    assert keeps == plan.keeps and plan.n_compressed == min(allowed)
    assert ratio - 1e-12 <= _achieved(mods, keeps)  # the overall ratio is met
    for b in range(n):
        blk = [m for m in mods if m.block == b]
        if b < plan.first_block:
            assert all(keeps[m.name] == 1.0 for m in blk)
            continue
        # Each compressed block removes c_block <= cap before rounding, and at most one rank step more after it.
        removed = sum(m.params - plan.ranks[m.name] * (m.out_features + m.in_features) for m in blk)
        step = max((m.out_features + m.in_features) / m.params for m in blk)
        assert plan.block_removal <= cap + 1e-9 and removed / sum(m.params for m in blk) <= cap + step
    # It reads no text: only the ratio, the cap and the block sizes (the same plan for any calibration).
    assert LastLayersAllocator(fraction=None).allocate(AllocationContext(mods, n, stats={}), ratio) == keeps
