"""GFWSVD and KFAC-SVD on random tensors: the two-sided whitened truncation, the Kronecker Fisher
estimators, the output-gradient Gram and the damping."""

from __future__ import annotations

import pytest
import torch

from methods import parse_method
from methods._linalg import Whitening, two_sided_truncate, whitening
from methods.components import LinearStats
from methods.gfwsvd import KroneckerFisherFactorizer, shrink_schedule
from methods.kfac_svd import KfacFactorizer
from methods.kronecker import (
    KroneckerFisher,
    OutputGradientGram,
    clip_token_norms,
    damped_cholesky,
    nearest_kronecker,
    shrink,
)
from methods.statistics import GramProduct
from methods.svd import PlainFactorizer
from methods.svd_llm import WhitenedFactorizer

CPU = torch.device("cpu")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _w(seed: int, m: int, n: int) -> torch.Tensor:
    return torch.randn(m, n, generator=_gen(seed), dtype=torch.float64)


def _spd(seed: int, p: int) -> torch.Tensor:
    x = torch.randn(p, 3 * p, generator=_gen(seed), dtype=torch.float64)
    return x @ x.T / p


def _eye(p: int) -> Whitening:
    return Whitening(torch.eye(p, dtype=torch.float64), "cholesky")


def test_identity_factors_give_plain_svd():
    w = _w(0, 20, 12)
    a, b, s = two_sided_truncate(w, _eye(20), _eye(12), 4)
    plain = PlainFactorizer().factorize(w, None, 4)
    torch.testing.assert_close(a @ b, plain.dense(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(s, torch.linalg.svdvals(w))
    # Through the factorizers: identity Kronecker factors, no damping needed.
    st = LinearStats(gram=torch.eye(12, dtype=torch.float64), kron_fisher_out=torch.eye(20, dtype=torch.float64),
                     kron_fisher_in=torch.eye(12, dtype=torch.float64),
                     grad_out_gram=torch.eye(20, dtype=torch.float64))
    for fac in (KroneckerFisherFactorizer(), KfacFactorizer()):
        torch.testing.assert_close(fac.factorize(w, st, 4).dense(), plain.dense(), rtol=1e-10, atol=1e-10)


def test_identity_output_factor_is_svd_llm_whitening():
    w, gram = _w(1, 16, 24), _spd(2, 24)
    st = LinearStats(gram=gram, grad_out_gram=3.0 * torch.eye(16, dtype=torch.float64))
    kfac = KfacFactorizer(input_shrink=0.0, output_shrink=0.0).factorize(w, st, 5)
    svd_llm = WhitenedFactorizer().factorize(w, LinearStats(gram=gram), 5)
    torch.testing.assert_close(kfac.dense(), svd_llm.dense(), rtol=1e-9, atol=1e-9)
    # The same truncation from the linear-algebra core, both sides given.
    a, b, _ = two_sided_truncate(w, _eye(16), whitening(gram), 5)
    torch.testing.assert_close(a @ b, svd_llm.dense(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("m,n,k", [(18, 10, 3), (10, 18, 6)])
def test_truncation_minimises_the_kronecker_weighted_error(m, n, k):
    """Eckart-Young on L_B^T W L_A: the error is the dropped whitened spectrum, below any other rank-k
    matrix (plain SVD, a random rank-k competitor) in the weighted norm."""
    w, bf, af = _w(3, m, n), _spd(4, m), _spd(5, n)
    left, right = whitening(bf), whitening(af)
    a, b, s = two_sided_truncate(w, left, right, k)

    def weighted(approx: torch.Tensor) -> float:  # sqrt(tr(D^T B D A)) = ||B^{1/2} D A^{1/2}||_F
        d = w - approx
        return float(torch.trace(d.T @ bf @ d @ af).sqrt())

    ours = weighted(a @ b)
    assert ours == pytest.approx(float(s[k:].pow(2).sum().sqrt()), rel=1e-8)
    assert ours < weighted(PlainFactorizer().factorize(w, None, k).dense())
    competitor = (a + 0.05 * _w(6, m, k)) @ (b + 0.05 * _w(7, k, n))
    assert ours < weighted(competitor)
    # LEMS's untransposed left whitening: a valid rank-k factorization, but not the optimum.
    au, bu, _ = two_sided_truncate(w, left, right, k, left_transposed=False)
    assert torch.linalg.matrix_rank(au @ bu) == k and weighted(au @ bu) > ours


def test_nearest_kronecker_recovers_an_exact_kronecker_fisher():
    """Gradients G_d = P Z_d Q^T with white Z_d have Fisher (Q Q^T) kron (P P^T) in expectation; with
    the rearranged operator exactly rank one the iteration returns those factors up to scale."""
    m, n, k = 6, 5, 4000
    p, q = _w(8, m, m), _w(9, n, n)
    z = torch.randn(k, m, n, generator=_gen(10), dtype=torch.float64)
    grads = p @ z @ q.T
    out, inn, steps = nearest_kronecker(grads, 1e-10, 200)
    bt, at = p @ p.T, q @ q.T
    cos = lambda x, y: float((x * y).sum() / (x.norm() * y.norm()))  # noqa: E731
    assert cos(out, bt) > 0.99 and cos(inn, at) > 0.99 and steps < 200
    assert torch.allclose(out, out.T) and torch.linalg.eigvalsh(out).min() > 0


def test_nearest_kronecker_is_the_top_singular_pair_of_the_rearranged_fisher():
    m, n, k = 4, 3, 5
    grads = torch.randn(k, m, n, generator=_gen(11), dtype=torch.float64)
    # R[(i, l), (j, o)] = (1/K) sum_d G_d[i, j] G_d[l, o]: the Van Loan rearrangement, (m^2, n^2).
    r = torch.einsum("dij,dlo->iljo", grads, grads).reshape(m * m, n * n) / k
    u, s, vh = torch.linalg.svd(r)
    out, inn, _ = nearest_kronecker(grads.float(), 1e-12, 500)
    ref_out = (u[:, 0] * s[0].sqrt()).reshape(m, m)
    ref_in = (vh[0] * s[0].sqrt()).reshape(n, n)
    sign = torch.sign((ref_out * out).sum())
    torch.testing.assert_close(out, sign * ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(inn, sign * ref_in, rtol=1e-4, atol=1e-5)


def test_kronecker_fisher_statistic_groups_windows_and_one_step_streams():
    grads = [_w(20 + i, 5, 3) for i in range(4)]
    paired = KroneckerFisher(group=2).accumulator(3, CPU, GramProduct())
    one = KroneckerFisher(estimator="one-step").accumulator(3, CPU, GramProduct())
    for i, g in enumerate(grads):
        paired.add(g, None, i)
        one.add(g, None, i)
    res = paired.result()
    assert int(res["kron_fisher_samples"]) == 2 and res["kron_fisher_out"].shape == (5, 5)
    means = torch.stack([(grads[0] + grads[1]) / 2, (grads[2] + grads[3]) / 2])
    ref_out, ref_in, _ = nearest_kronecker(means.float(), 1e-6, 100)
    torch.testing.assert_close(res["kron_fisher_out"], ref_out)
    torch.testing.assert_close(res["kron_fisher_in"], ref_in)
    streamed = one.result()
    torch.testing.assert_close(streamed["kron_fisher_out"], sum(g @ g.T for g in grads) / 4, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(streamed["kron_fisher_in"], sum(g.T @ g for g in grads) / 4, rtol=1e-6, atol=1e-8)
    assert KroneckerFisher().key != KroneckerFisher(group=2).key != KroneckerFisher(estimator="one-step").key


def test_output_gradient_gram_cuts_edges_clips_norms_and_masks():
    g = torch.randn(1, 16, 4, generator=_gen(30), dtype=torch.float64)
    g[0, 7] *= 100.0  # an outlier token, clipped to 10x the mean norm
    mask = torch.ones(1, 16, dtype=torch.bool)
    mask[0, 9] = False
    acc = OutputGradientGram().accumulator(4, CPU, GramProduct())
    acc.add(g, mask, 0)
    res = acc.result()
    kept = g[:, 2:14].float()  # int(16 * 0.125) = 2 positions dropped at each end
    clipped = clip_token_norms(kept, mask[:, 2:14], 0.1, 10.0)
    rows = clipped[mask[:, 2:14]].double()
    torch.testing.assert_close(res["grad_out_gram"], rows.T @ rows)
    assert int(res["grad_out_tokens"]) == 11
    norms = clipped[0].norm(dim=-1)
    live = norms[mask[0, 2:14]]
    assert float(live.max()) <= 10.0 * float(kept[0][mask[0, 2:14]].norm(dim=-1).mean()) * (1 + 1e-6)
    plain = OutputGradientGram(edge_fraction=0.0, clip=False).accumulator(4, CPU, GramProduct())
    plain.add(g, None, 0)
    flat = g.reshape(-1, 4).float().double()
    torch.testing.assert_close(plain.result()["grad_out_gram"], flat.T @ flat)
    assert OutputGradientGram().feed == "output-grad" and OutputGradientGram().requires_causal_lm
    assert OutputGradientGram().key != OutputGradientGram(clip=False).key


def test_damping_schedules_and_errors():
    assert shrink_schedule(1e-4, 10.0, 10) == (0.0, 1e-4, 1e-3, 1e-2, 0.1, 1.0)
    singular = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(shrink(singular, 0.5), torch.diag(torch.tensor([5 / 6, 5 / 6, 1 / 3],
                                                                             dtype=torch.float64)))
    white, alpha = damped_cholesky(singular, shrink_schedule(1e-4, 10.0, 10), "test")
    assert alpha == 1e-4 and torch.isfinite(white.factor).all()
    with pytest.raises(FloatingPointError, match="not positive definite"):
        damped_cholesky(singular, (0.0,), "test")
    for bad in (torch.full((3, 3), float("nan"), dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)):
        with pytest.raises(FloatingPointError):
            damped_cholesky(bad, (0.1,), "test")
    w = _w(40, 6, 4)
    nan_stats = LinearStats(kron_fisher_out=torch.full((6, 6), float("inf"), dtype=torch.float64),
                            kron_fisher_in=torch.eye(4, dtype=torch.float64))
    with pytest.raises(FloatingPointError, match="non-finite"):
        KroneckerFisherFactorizer().factorize(w, nan_stats, 2)
    with pytest.raises(ValueError, match="kronecker-fisher statistic"):
        KroneckerFisherFactorizer().factorize(w, LinearStats(), 2)
    with pytest.raises(ValueError, match="output-gradient Gram"):
        KfacFactorizer().factorize(w, LinearStats(gram=torch.eye(4, dtype=torch.float64)), 2)


def test_methods_parse_with_their_statistics_and_options():
    g = parse_method("gfwsvd[factorizer.group=4]")
    assert [s.key for s in g.statistics()] == ["gram", "kronecker-fisher[group=4,tol=1e-06,max_iter=100]"]
    assert "next-token" in " ".join(g.causal_lm_reasons())
    k = parse_method("kfac-svd[kfac-whitened.left=untransposed]")
    assert [s.key for s in k.statistics()] == ["gram", "output-grad-gram[edge=0.125,clip=0.1-10]"]
    for bad in ("kfac-svd[kfac-whitened.left=both]", "gfwsvd[factorizer.estimator=lanczos]",
                "kfac-svd[kfac-whitened.input_shrink=2]", "gfwsvd[factorizer.group=0]"):
        with pytest.raises(ValueError):
            parse_method(bad)
