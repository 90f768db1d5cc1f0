"""Dobi-SVD's math (methods/dobi.py) and components (methods/dobi_svd.py) on small random tensors."""

from __future__ import annotations

import pytest
import torch

from methods import ModuleInfo, parse_method, rank_for
from methods._linalg import whitened_truncate, whitening
from methods.components import LinearStats
from methods.dobi import (
    IncrementalPCA,
    StableSVD,
    covariance_basis,
    gamma_init,
    gamma_scale,
    gamma_storage,
    gram_root,
    ipca_basis,
    project_factors,
    remap_params,
    soft_step,
    soft_truncate,
    stable_inverse_gaps,
    stored_rank,
    window_subspace,
)
from methods.dobi_svd import DobiGammaAllocator, DobiIPCAFactorizer, WindowGrams, keep_for_rank
from methods.statistics import GramProduct


def _with_spectrum(rows: int, cols: int, s: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(rows, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(cols, len(s), generator=g, dtype=torch.float64))
    return u @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ v.T


def test_soft_truncation_gradient_matches_finite_differences():
    a = _with_spectrum(7, 5, [5.0, 4.0, 3.0, 2.0, 1.0]).requires_grad_(True)
    gamma = torch.tensor(2.7, dtype=torch.float64, requires_grad=True)
    # window 5 covers the whole rank: the backward is then exact (a smaller window omits the
    # coupling to the triplets it never computed, as the official code does).
    assert torch.autograd.gradcheck(lambda x, g: soft_truncate(x, g, beta=2.0, window=5), (a, gamma))
    wide = _with_spectrum(4, 6, [3.0, 2.5, 1.0, 0.5], seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, g: soft_truncate(x, g, beta=2.0, window=5), (wide, gamma))


def test_stable_backward_stays_finite_with_repeated_and_zero_singular_values():
    a = _with_spectrum(8, 6, [3.0, 2.0, 2.0, 2.0, 0.0, 0.0]).float().requires_grad_(True)
    out = soft_truncate(a, torch.tensor(2.5, requires_grad=True), window=5)
    (out * torch.randn_like(out)).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()
    e = stable_inverse_gaps(torch.tensor([2.0, 2.0, 1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.isfinite(e).all() and torch.equal(e, -e.T)
    assert e[1, 0] == pytest.approx(11 / 4)  # equal values: K + 1 = 11 Taylor terms of 1 / s^2
    assert e[4, 3] == 100.0  # both at the floor
    assert e[2, 0] == pytest.approx(1 / (4 - 1))
    # Singular values apart by less than 1e-10 take the Taylor sum, not 1 / (s_j^2 - s_i^2).
    close = stable_inverse_gaps(torch.tensor([1.0 + 5e-11, 1.0], dtype=torch.float64))
    assert close[1, 0] == pytest.approx(11.0, rel=1e-6)


def test_backward_matches_autograd_of_the_full_svd():
    a = _with_spectrum(6, 4, [4.0, 3.0, 1.5, 0.5]).requires_grad_(True)
    gu, gs, gv = torch.randn(6, 4, dtype=torch.float64), torch.randn(4, dtype=torch.float64), torch.randn(4, 4, dtype=torch.float64)
    u, s, v = StableSVD.apply(a, 4)
    ours = torch.autograd.grad((u * gu).sum() + (s * gs).sum() + (v * gv).sum(), a)[0]
    b = a.detach().clone().requires_grad_(True)
    u2, s2, vh2 = torch.linalg.svd(b, full_matrices=False)
    sign = torch.sign((u2 * u.detach()).sum(0))  # same sign convention (LAPACK either way)
    ref = torch.autograd.grad((u2 * sign * gu).sum() + (s2 * gs).sum() + (vh2.T * sign * gv).sum(), b)[0]
    torch.testing.assert_close(ours, ref)


def test_large_gamma_keeps_the_activations_and_small_gamma_drops_them():
    a = _with_spectrum(10, 8, [4.0, 3.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # rank 3
    torch.testing.assert_close(soft_truncate(a, torch.tensor(4.0, dtype=torch.float64)), a)
    assert soft_step(torch.tensor(0.0), 6, 10.0).max() < 1e-8  # gamma -> 0: every T_i -> 0
    # The forward clamps gamma to >= 1 (official): half of the top triplet is all that is left.
    u, s, vh = torch.linalg.svd(a)
    top = 0.5 * s[0] * torch.outer(u[:, 0], vh[0])
    torch.testing.assert_close(soft_truncate(a, torch.tensor(0.0, dtype=torch.float64)), top)
    batch = torch.stack([a, 2 * a])
    torch.testing.assert_close(soft_truncate(batch, torch.tensor(4.0, dtype=torch.float64)), batch)


def test_gamma_units_and_storage_accounting():
    assert gamma_scale(4096, 4096, 2048) == 2.0 and gamma_scale(576, 1536, 2048) == 1.0
    shapes = [(64, 64), (32, 64), (160, 64)]
    for remap in (False, True):
        size = sum(float(gamma_storage(torch.tensor(gamma_init(0.4, m, n, gamma_scale(m, n, 32), remap)), m, n,
                                       gamma_scale(m, n, 32), remap)) for m, n in shapes)
        assert size / sum(m * n for m, n in shapes) == pytest.approx(0.4)
    assert float(gamma_storage(torch.tensor(1e6), 64, 32, 1.0, False)) == 64 * 32  # capped at m n
    assert stored_rank(10.2, 4096, 4096, 2.0) == 22 and stored_rank(0.0, 64, 64, 1.0) == 1
    assert remap_params(4096, 11008, 10) == 11008 * 10 + 20
    mod = ModuleInfo("x", 0, "x", 160, 64)
    for rank in (1, 7, 30):
        assert rank_for(160, 64, keep_for_rank(mod, rank)) == rank
    assert keep_for_rank(mod, 64) == 1.0  # no saving: dense
    keeps = DobiGammaAllocator.keeps([mod], {"x": 6.3}, seq_len=32)
    assert rank_for(160, 64, keeps["x"]) == 7 * 2  # ceil(6.3) x scale 64 / 32


def test_incremental_pca_is_exact_when_the_data_fits_its_components():
    g = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(12, 3, generator=g, dtype=torch.float64))
    rows = torch.randn(40, 3, generator=g, dtype=torch.float64) @ basis.T + 0.0
    for center in (False, True):
        ipca = IncrementalPCA(3, center=center)
        for chunk in rows.split(7):
            ipca.partial_fit(chunk)
        data = rows - rows.mean(0) if center else rows
        _, _, vh = torch.linalg.svd(data, full_matrices=False)
        proj = ipca.components.T @ ipca.components
        torch.testing.assert_close(proj, vh[:3].T @ vh[:3])


def test_ipca_update_is_the_exact_projection_onto_the_top_output_subspace():
    g = torch.Generator().manual_seed(1)
    m, n, k, length = 10, 12, 4, 6
    weight = torch.randn(m, n, generator=g, dtype=torch.float64)
    # Every window's inputs lie in one k-dim input subspace, so every window's outputs lie in the
    # k-dim output subspace span(W P^T): the IPCA and the exact covariance reading must agree.
    p = torch.randn(k, n, generator=g, dtype=torch.float64)
    windows = [torch.randn(length, k, generator=g, dtype=torch.float64) @ p for _ in range(5)]
    grams = torch.stack([x.T @ x for x in windows])
    tokens = torch.full((5,), length)
    v = ipca_basis(weight, grams, tokens, k)
    exact = covariance_basis(weight, grams.sum(0), k)
    torch.testing.assert_close(v @ v.T, exact @ exact.T)
    a, b, s = project_factors(weight, v)
    assert a.shape == (m, k) and b.shape == (k, n)
    torch.testing.assert_close(a @ b, v @ v.T @ weight)
    for x in windows:  # nothing of these outputs is lost
        torch.testing.assert_close(x @ (a @ b).T, x @ weight.T)


def test_window_subspace_from_the_gram_root_matches_the_output_covariance():
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(12, 5, generator=g, dtype=torch.float64)  # m > n: the root path
    x = torch.randn(4, 5, generator=g, dtype=torch.float64)  # a short window: rank 4
    gram = x.T @ x
    root = gram_root(gram)
    assert root.shape == (5, 4)
    fast, slow = window_subspace(weight, gram, 3, root), window_subspace(weight, gram, 3)
    torch.testing.assert_close(fast @ fast.T, slow @ slow.T)
    _, _, vh = torch.linalg.svd(x @ weight.T)
    torch.testing.assert_close(fast @ fast.T, vh[:3].T @ vh[:3])


def test_covariance_reading_is_svd_llm():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(9, 7, generator=g, dtype=torch.float64)
    x = torch.randn(50, 7, generator=g, dtype=torch.float64)
    gram = x.T @ x
    a, b, _ = project_factors(weight, covariance_basis(weight, gram, 3))
    svd_llm_a, svd_llm_b, _ = whitened_truncate(weight, whitening(gram), 3)
    torch.testing.assert_close(a @ b, svd_llm_a @ svd_llm_b)
    # SVD-LLM minimises ||(W - W') X||_F at rank 3; the projection reaches the same error.
    err = torch.linalg.norm(x @ (weight - a @ b).T)
    s = torch.linalg.svdvals(x @ weight.T)
    assert err == pytest.approx(float(s[3:].square().sum().sqrt()))


def test_window_grams_and_the_factorizer():
    stat = WindowGrams("dense", max_windows=3)
    acc = stat.accumulator(5, torch.device("cpu"), GramProduct("float64"))
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    acc.add(x, mask, 0)
    acc.add(x, None, 1)  # the fourth window is over the cap
    res = acc.result()
    assert res["gram_windows"].shape == (3, 5, 5) and res["window_tokens"].tolist() == [3, 4, 4]
    torch.testing.assert_close(res["gram_windows"][0], x[0, :3].T @ x[0, :3])
    weight = torch.randn(6, 5, dtype=torch.float64)
    fact = DobiIPCAFactorizer().factorize(weight, LinearStats.from_results(res), 2)
    assert fact.rank == 2 and fact.info == {"storage_params": remap_params(6, 5, 2)}
    with pytest.raises(ValueError, match="per-window Grams"):
        DobiIPCAFactorizer().factorize(weight, LinearStats(gram=torch.eye(5)), 2)
    with pytest.raises(ValueError, match="fewer than rank"):
        ipca_basis(weight, res["gram_windows"][:1], torch.tensor([1]), 3)


def test_method_string_options_and_declarations():
    method = parse_method("dobi-svd[dobi-gamma.epochs=1,dobi-gamma.n_sequences=4]")
    assert method.probes == ("dobi_training",) and method.allocation_uses_calibration
    assert method.allocator.epochs == 1 and method.allocator.lr == 5.0 and method.allocator.lambda_reg == 200.0
    assert method.needs_compressed_inputs  # the official IPCA collects on the truncated model
    assert [s.key for s in method.statistics()] == ["gram", "window-grams-paired-256"]
    dense = parse_method("dobi-svd[dobi-ipca.subspace=covariance,dobi-ipca.inputs=dense]")
    assert not dense.needs_compressed_inputs and [s.key for s in dense.statistics()] == ["gram"]
    with pytest.raises(ValueError, match="subspace"):
        parse_method("dobi-svd[dobi-ipca.subspace=pca]")
