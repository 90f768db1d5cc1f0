"""Properties of the linear-algebra core on random matrices (rank rule, whitening, truncation)."""

from __future__ import annotations

import math

import pytest
import torch

from methods._linalg import (
    output_error,
    paired_output_error,
    rank_from_keep,
    rank_from_ratio,
    truncated_svd,
    whitened_truncate,
    whitening,
)


def _acts(n: int, tokens: int, seed: int, outliers: bool = True) -> torch.Tensor:
    """Token activations (tokens, n) with a few large channels, as in LLMs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64)
    if outliers:
        x[:, :3] *= 30.0
    return x


@pytest.mark.parametrize("shape,k", [((48, 32), 5), ((32, 80), 16), ((64, 64), 1)])
def test_plain_truncation_error_equals_dropped_singular_values(shape, k):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a, b, s = truncated_svd(w, k)
    assert a.shape == (shape[0], k) and b.shape == (k, shape[1])
    err = torch.linalg.norm(w - a @ b)
    assert err.item() == pytest.approx(math.sqrt((s[k:] ** 2).sum().item()), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whitened_error_equals_dropped_whitened_sigma_and_beats_plain(seed):
    m, n, k = 40, 56, 12
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x = _acts(n, 500, seed + 10)
    h = x.T @ x
    white = whitening(h)
    assert white.method == "cholesky"
    a, b, s = whitened_truncate(w, white, k)
    err_white = torch.linalg.norm((w - a @ b) @ x.T).item()
    assert err_white == pytest.approx(math.sqrt((s[k:] ** 2).sum().item()), rel=1e-8)
    assert output_error(w, a @ b, h) == pytest.approx(err_white, rel=1e-8)
    pa, pb, _ = truncated_svd(w, k)
    err_plain = torch.linalg.norm((w - pa @ pb) @ x.T).item()
    assert err_white <= err_plain * (1 + 1e-12)
    assert err_white < 0.9 * err_plain  # with outlier channels the gap is large, not a rounding tie


def test_rank_deficient_inputs_take_eigen_fallback_with_finite_factors():
    n, tokens = 64, 20  # fewer tokens than features: H has rank 20
    x = _acts(n, tokens, 3)
    w = torch.randn(32, n, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    white = whitening(x.T @ x)
    assert white.method == "eigen" and white.clamped >= n - tokens
    a, b, s = whitened_truncate(w, white, 8)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    # still the optimum on the data it saw: error equals the dropped whitened sigma (clamped H)
    err = torch.linalg.norm((w - a @ b) @ x.T).item()
    assert err <= math.sqrt((s[8:] ** 2).sum().item()) * (1 + 1e-6)


def test_nonfinite_gram_is_reported():
    h = torch.eye(4, dtype=torch.float64)
    h[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        whitening(h)


def test_paired_output_error_matches_materialised():
    g = torch.Generator().manual_seed(5)
    w, w2 = torch.randn(6, 9, generator=g, dtype=torch.float64), torch.randn(6, 9, generator=g, dtype=torch.float64)
    x, xh = torch.randn(100, 9, generator=g, dtype=torch.float64), torch.randn(100, 9, generator=g, dtype=torch.float64)
    direct = torch.linalg.norm(w2 @ xh.T - w @ x.T).item()
    assert paired_output_error(w, w2, x.T @ x, xh.T @ xh, x.T @ xh) == pytest.approx(direct, rel=1e-9)


@pytest.mark.parametrize("m,n", [(256, 256), (688, 256), (4096, 11008), (64, 160)])
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6, 0.8])
def test_achieved_ratio_within_one_rank_step(m, n, ratio):
    k = rank_from_ratio(m, n, ratio)
    achieved = 1 - k * (m + n) / (m * n)
    step = (m + n) / (m * n)
    assert ratio <= achieved < ratio + step  # floor removes slightly more, never less
    assert k == math.floor((1 - ratio) * m * n / (m + n))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5])
def test_ratio_outside_open_interval_rejected(bad):
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        rank_from_ratio(8, 8, bad)
    if bad > 1 or bad <= 0:
        with pytest.raises(ValueError):
            rank_from_keep(8, 8, bad)


@pytest.mark.parametrize("shape,k", [((96, 40), 12), ((40, 96), 12), ((64, 64), 30)])
def test_gram_eigh_driver_matches_the_svd_to_1e6(shape, k):
    """The Gram-eigendecomposition route (the CUDA default) gives the same truncation as the full SVD:
    calibration error within 1e-6 relative, on a spectrum with outlier channels."""
    m, n = shape
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    x = _acts(n, 4 * n, seed=4)
    h = x.T @ x
    white = whitening(h)
    ref_a, ref_b, ref_s = whitened_truncate(w, white, k, driver="svd")
    a, b, s = whitened_truncate(w, white, k, driver="gram-eigh")
    ref_err, err = output_error(w, ref_a @ ref_b, h), output_error(w, a @ b, h)
    assert err == pytest.approx(ref_err, rel=1e-6)
    torch.testing.assert_close(s, ref_s, rtol=1e-6, atol=1e-9 * float(ref_s[0]))
    pa, pb, _ = truncated_svd(w, k, driver="gram-eigh")
    qa, qb, _ = truncated_svd(w, k, driver="svd")
    assert float(torch.linalg.norm(w - pa @ pb)) == pytest.approx(float(torch.linalg.norm(w - qa @ qb)), rel=1e-6)


def test_gram_eigh_falls_back_to_the_svd_when_sigma_k_vanishes():
    u = torch.linalg.qr(torch.randn(20, 3, dtype=torch.float64))[0]
    w = u @ torch.randn(3, 10, dtype=torch.float64)  # rank 3
    a, b, s = truncated_svd(w, 5, driver="gram-eigh")
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a @ b, w)
