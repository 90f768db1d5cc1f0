"""Dobi-SVD's math (Wang et al., arXiv 2502.02723, ICLR 2025; code github.com/wangqinsi1/Dobi-SVD).

Pure tensor code, device-agnostic; the components that use it are in :mod:`methods.dobi_svd` and the
whole-model training of the truncation positions in ``harness/engine/probes/dobi_training.py``.

1. **Differentiable truncation of activations** (``modules/stable_svd.py`` of the official code). For
   one target linear and one calibration window, ``A = X W^T: (L, m)`` (``L`` tokens) is replaced by

       A_gamma = U diag(sigma * T(gamma)) V^T,     T_i(gamma) = 1/2 tanh(beta (gamma - i)) + 1/2

   (``i = 1, 2, ...``; ``beta = 10``): a soft step that keeps the singular values before position
   ``gamma`` and drops those after it, differentiable in ``gamma``. The SVD's backward
   (:class:`StableSVD`) is the usual one with ``F_ij = 1 / (s_j^2 - s_i^2)``, made finite as the
   official code does: singular values clamped at ``1e-10``; for ``s_i = s_j`` exactly
   ``F = (K + 1) / s^2`` and for ``0 < |s_i - s_j| <= 1e-10`` the ``K + 1``-term Taylor (geometric)
   series ``1 / s_j^2 sum_t (s_i / s_j)^(2t)`` (``K = 10``); two clamped values give ``100``.

2. **Units of gamma** (:func:`gamma_scale`). The official ``gamma`` counts singular values of one
   window's activation (at most ``L = 2048``), and the weight's rank is ``gamma min(m, n) / L``. For a
   layer with ``min(m, n) <= L`` (every layer of a small model, or short windows) the official code
   divides by ``int(min(m, n) / L) = 0``; we take the scale ``max(1, min(m, n) / L)``: plain rank
   whenever one window can resolve every direction, the official unit otherwise.

3. **Storage** (:func:`gamma_storage`): ``(m + n) r`` for a rank-``r`` pair, capped at ``m n``; with
   remapping ``max(m, n) r`` (:func:`remap_params`: the factors' first ``min(m, n)`` rows in 8 bits).

4. **Weight update by incremental PCA** (``weight_updater.py``): calibration runs through the
   truncated model; per window the top-``q`` right singular vectors of ``A`` (``V_s: (m, q)``, unit
   length, unweighted) are stacked, ``floor(min(m, n) / L)`` windows at a time, and fed to an
   incremental PCA (:class:`IncrementalPCA`, the sklearn algorithm the official code ports to torch)
   with ``k`` components; ``W' = V V^T W`` and ``W'`` is stored as a rank-``k`` pair.
   Here ``V_s`` comes from the window's input Gram: the right singular vectors of ``A_s = X_s W^T``
   are the eigenvectors of ``A_s^T A_s = W H_s W^T`` (:func:`window_subspace`).
   The exact alternative (:func:`covariance_basis`) is the top-``k`` eigenvectors of
   ``sum_s A_s^T A_s = W H W^T``; note that ``V V^T W`` with that ``V`` is SVD-LLM's truncation.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

VAL_EPS = 1e-10  # official val_epsilon: floor of the singular values in the backward
CLOSE_EPS = 1e-10  # official diff_epsilon: |s_i - s_j| at or below it takes the Taylor branch
TOO_SMALL = 1e2  # official grad_epsilon: F for two singular values both at the floor
TAYLOR_TERMS = 10  # official K (the series has K + 1 terms)


# -- 1. soft truncation with a stable SVD backward ------------------------------------------------

def soft_step(gamma: Tensor, count: int, beta: float) -> Tensor:
    """``T_i = 1/2 tanh(beta (gamma - i)) + 1/2`` for ``i = 1..count``: ``(count,)`` in gamma's dtype."""
    i = torch.arange(1, count + 1, device=gamma.device, dtype=gamma.dtype)
    return 0.5 * torch.tanh(beta * (gamma - i)) + 0.5


def stable_inverse_gaps(s: Tensor, taylor_terms: int = TAYLOR_TERMS, close_eps: float = CLOSE_EPS) -> Tensor:
    """``E: (q, q)`` with ``E_ij = 1 / (s_j^2 - s_i^2)`` off the diagonal, 0 on it, made finite.

    ``s`` is sorted descending. For ``i > j`` (``s_i <= s_j``): two values at the floor ``VAL_EPS``
    give ``TOO_SMALL``; equal values ``(K + 1) / s_j^2``; values closer than ``close_eps`` the Taylor
    sum ``(1 - r^(2(K + 1))) / (1 - r^2) / s_j^2`` with ``r = s_i / s_j``; else the exact value. The
    upper triangle is minus the transpose (``E`` is antisymmetric), as in the official code.
    """
    q = s.shape[0]
    sc = s.clamp(min=VAL_EPS)
    si, sj = sc[:, None], sc[None, :]  # row i, column j
    diff = (sj - si).abs()
    n_terms = taylor_terms + 1
    exact = 1.0 / ((sj - si) * (sj + si))
    r2 = (si / sj) ** 2
    taylor = (1.0 - r2 ** n_terms) / (1.0 - r2).where(diff > 0, torch.ones_like(r2)) / sj ** 2
    lower = torch.where(diff > close_eps, exact, taylor)
    lower = torch.where(diff == 0, n_terms / sj ** 2, lower)
    lower = torch.where((si == VAL_EPS) & (sj == VAL_EPS), torch.full_like(lower, TOO_SMALL), lower)
    low = torch.tril(torch.ones(q, q, dtype=torch.bool, device=s.device), diagonal=-1)
    e = torch.where(low, lower, torch.zeros_like(lower))
    return e - e.T


class StableSVD(torch.autograd.Function):
    """Top-``q`` SVD ``A ~ U diag(s) V^T`` of ``A: (L, m)`` with the official stable backward.

    Forward: LAPACK's thin SVD truncated to ``q`` (the official code uses ``torch.svd_lowrank`` with
    ``q`` columns and 2 power iterations, a randomized approximation of the same triplets).
    Backward (``q`` may be below the rank, hence the two projection terms)::

        gA = U [ (skew(U^T gU) * E) S + S (skew(V^T gV) * E) + diag(gs) ] V^T
             + (I - U U^T) gU S^-1 V^T + U S^-1 gV^T (I - V V^T)

    with ``skew(X) = X - X^T`` and ``E`` from :func:`stable_inverse_gaps`.
    """

    @staticmethod
    def forward(ctx, a: Tensor, q: int, taylor_terms: int = TAYLOR_TERMS,  # type: ignore[override]
                close_eps: float = CLOSE_EPS) -> tuple[Tensor, Tensor, Tensor]:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        u, s, v = u[:, :q].contiguous(), s[:q].contiguous(), vh[:q].T.contiguous()
        ctx.save_for_backward(u, s, v)
        ctx.taylor_terms, ctx.close_eps = taylor_terms, close_eps
        return u, s, v

    @staticmethod
    def backward(ctx, gu: Tensor | None, gs: Tensor | None, gv: Tensor | None):  # type: ignore[override]
        u, s, v = ctx.saved_tensors
        gu = torch.zeros_like(u) if gu is None else gu
        gv = torch.zeros_like(v) if gv is None else gv
        gs = torch.zeros_like(s) if gs is None else gs
        e = stable_inverse_gaps(s, ctx.taylor_terms, ctx.close_eps)
        utgu, vtgv = u.T @ gu, v.T @ gv
        core = (utgu - utgu.T) * e * s[None, :] + s[:, None] * ((vtgv - vtgv.T) * e) + torch.diag(gs)
        ga = u @ core @ v.T
        inv = 1.0 / s.clamp(min=VAL_EPS)
        gu_s = gu * inv[None, :]
        ga = ga + (gu_s - u @ (u.T @ gu_s)) @ v.T
        sgv = (gv * inv[None, :]).T  # S^-1 gV^T: (q, m)
        ga = ga + u @ (sgv - (sgv @ v) @ v.T)
        return ga, None, None, None


def soft_truncate(a: Tensor, gamma: Tensor, beta: float = 10.0, window: int = 5,
                  taylor_terms: int = TAYLOR_TERMS, close_eps: float = CLOSE_EPS) -> Tensor:
    """``U diag(sigma * T(gamma)) V^T`` of ``a: (L, m)`` (or ``(B, L, m)``, one SVD per window).

    As in the official ``SVDTransformLayer.forward``: only the top ``q = int(gamma) + window``
    singular triplets are computed (``T`` is below ``1e-21`` beyond them at ``beta = 10``), and the
    position is clamped to ``[1, q]`` in the forward (so ``gamma -> 0`` still keeps half of the top
    triplet, and ``gamma`` at or beyond the rank halves the last one; the range penalty of the
    training loss keeps ``gamma`` inside).

    Args:
        a: Activations, float32 or float64.
        gamma: Scalar truncation position (a trainable ``nn.Parameter`` during training).
        beta: Steepness of the soft step.
        window: Singular values computed beyond ``int(gamma)``.

    Returns:
        The soft-truncated activations, same shape and dtype as ``a``.
    """
    if a.dim() == 3:
        return torch.stack([soft_truncate(x, gamma, beta, window, taylor_terms, close_eps) for x in a])
    full = min(a.shape)
    q = min(full, max(1, int(gamma.detach()) + window))
    u, s, v = StableSVD.apply(a, q, taylor_terms, close_eps)
    g = gamma.to(a.dtype).clamp(1.0, float(q))
    return (u * (s * soft_step(g, q, beta))[None, :]) @ v.T


# -- 2./3. units and storage ----------------------------------------------------------------------

def gamma_scale(m: int, n: int, seq_len: int) -> float:
    """Weight rank per unit of gamma: ``max(1, min(m, n) / L)`` (module docstring, point 2)."""
    return max(1.0, min(m, n) / seq_len)


def gamma_max(m: int, n: int, seq_len: int) -> float:
    """Largest meaningful gamma: ``min(m, n) / scale = min(m, n, L)`` (official upper penalty: ``L``)."""
    return min(m, n) / gamma_scale(m, n, seq_len)


def remap_params(m: int, n: int, rank: int) -> int:
    """Storage of a remapped rank-``rank`` pair in 16-bit parameter equivalents: ``max(m, n) r + 2 r``.

    The official ``DOBI_quantize`` stores, per singular triplet, the first ``min(m, n)`` entries of
    ``u_i s_i`` and of ``v_i`` in 8 bits (``2 min(m, n)`` bytes = ``min(m, n)`` equivalents) with one
    16-bit absmax each (2 equivalents), and the longer factor's other ``|m - n|`` entries in 16 bits.
    """
    return max(m, n) * rank + 2 * rank


def gamma_storage(gamma: Tensor, m: int, n: int, scale: float, remap: bool) -> Tensor:
    """Differentiable storage of one layer at ``gamma``: ``min(c r, m n)`` with ``r = gamma scale``
    and ``c = m + n`` (``max(m, n)`` with remapping; the training loss's size, official code)."""
    per_rank = max(m, n) if remap else m + n
    size = per_rank * gamma * scale
    return torch.clamp(size, max=float(m * n))


def gamma_init(target_keep: float, m: int, n: int, scale: float, remap: bool) -> float:
    """Initial gamma, the uniform allocation at ``target_keep`` (official ``gamma_init``)."""
    per_rank = max(m, n) if remap else m + n
    return target_keep * m * n / per_rank / scale


def stored_rank(gamma: float, m: int, n: int, scale: float) -> int:
    """Rank the weight update stores for a learned ``gamma``: ``floor(ceil(gamma) scale)`` in
    ``[1, min(m, n)]`` (the official ``cut * ceil(gamma)``)."""
    return min(min(m, n), max(1, math.floor(math.ceil(gamma - 1e-9) * scale + 1e-9)))


# -- 4. the weight update ----------------------------------------------------------------------

class IncrementalPCA:
    """Incremental PCA of row vectors (the sklearn / official ``IncrementalPCAonGPU`` algorithm).

    Each :meth:`partial_fit` takes a batch ``X: (r, m)``, stacks the previous components scaled by
    their singular values, the batch (centred on its own mean) and, from the second batch on, the
    mean correction row ``sqrt(n_seen r / (n_seen + r)) (mean_old - mean_batch)``, and keeps the top
    ``k`` right singular vectors of the stack. Exact (equal to the PCA of all rows seen) whenever the
    data seen so far has rank at most ``k``; an approximation otherwise, as in the official code.

    Args:
        n_components: ``k``.
        center: Subtract the running mean (sklearn's and the official behaviour); False: PCA of the
            uncentred rows (the top-``k`` eigenvectors of ``sum x x^T`` when exact).
    """

    def __init__(self, n_components: int, center: bool = True) -> None:
        self.k, self.center = n_components, center
        self.components: Tensor | None = None  # (k, m)
        self.singular_values: Tensor | None = None
        self.mean: Tensor | None = None
        self.n_seen = 0

    def partial_fit(self, x: Tensor) -> IncrementalPCA:
        """Add the rows of ``x: (r, m)`` (any float dtype; computed in float64 on its device)."""
        x = x.to(torch.float64)
        r = x.shape[0]
        rows = [x]
        if self.center:
            batch_mean = x.mean(0)
            rows = [x - batch_mean]
            if self.mean is not None:
                corr = math.sqrt(self.n_seen * r / (self.n_seen + r)) * (self.mean - batch_mean)
                rows.append(corr[None, :])
                self.mean = (self.n_seen * self.mean + r * batch_mean) / (self.n_seen + r)
            else:
                self.mean = batch_mean
        if self.components is not None:
            assert self.singular_values is not None
            rows.insert(0, self.singular_values[:, None] * self.components)
        _, s, vh = torch.linalg.svd(torch.cat(rows), full_matrices=False)
        # sklearn's svd_flip (v-based): the largest entry of each component is positive.
        pick = vh.abs().argmax(1)
        sign = torch.sign(vh[torch.arange(vh.shape[0], device=vh.device), pick])
        vh = vh * torch.where(sign == 0, torch.ones_like(sign), sign)[:, None]
        self.components, self.singular_values = vh[: self.k], s[: self.k]
        self.n_seen += r
        return self


def gram_root(gram: Tensor, rel_floor: float = 1e-12) -> Tensor:
    """``R: (n, r)`` with ``R R^T = H`` over the eigenvalues above ``rel_floor`` times the largest
    (``r <= rank(H)``, at most the window's token count). Raises on a non-finite Gram."""
    h = gram.to(torch.float64)
    if not torch.isfinite(h).all():
        raise FloatingPointError("dobi-ipca: non-finite window Gram")
    vals, vecs = torch.linalg.eigh(0.5 * (h + h.T))
    keep = vals > rel_floor * vals.max().clamp(min=0)
    return vecs[:, keep] * vals[keep].sqrt()[None, :]


def window_subspace(weight: Tensor, gram: Tensor, q: int, root: Tensor | None = None) -> Tensor:
    """Top-``q`` right singular vectors of one window's ``A = X W^T``: ``(m, q')`` float64, ``q' <= q``.

    They are the top eigenvectors of ``A^T A = W H W^T`` with ``H = X^T X: (n, n)``, so the window's
    input Gram suffices. With ``root`` (:func:`gram_root` of ``H``), the left singular vectors of
    ``W R: (m, r)`` instead (cheaper when ``m > n`` or the window is short); only the ``r``
    directions the window spans are returned then. Raises on a non-finite Gram.
    """
    w = weight.to(torch.float64)
    if root is not None:
        u, _, _ = torch.linalg.svd(w @ root.to(w), full_matrices=False)
        return u[:, :q]
    cov = w @ gram.to(w) @ w.T
    if not torch.isfinite(cov).all():
        raise FloatingPointError("dobi-ipca: non-finite window covariance")
    _, vecs = torch.linalg.eigh(0.5 * (cov + cov.T))
    return vecs[:, -q:].flip(1)


def ipca_basis(weight: Tensor, window_grams: Tensor, window_tokens: Tensor, k: int, center: bool = False,
               roots: list[Tensor] | None = None) -> Tensor:
    """The official IPCA subspace ``V: (m, k)`` from per-window input Grams (module docstring, 4).

    Per window ``s``: ``q_s = min(ceil(k / scale_s), L_s, m, n)`` top right singular vectors of
    ``A_s`` (``scale_s = max(1, min(m, n) / L_s)``, the gamma unit: ``q_s`` is the window's gamma);
    windows are fed ``max(1, floor(min(m, n) / L))`` at a time (the official ``Ngamma``), and a
    batch is extended until it holds at least ``k`` rows, which the first fit needs.

    Args:
        weight: ``W: (m, n)``.
        window_grams: ``(S, n, n)``, ``X_s^T X_s`` per calibration window.
        window_tokens: ``(S,)`` tokens per window.
        k: Components (the stored rank).
        center: Mean-centre the stacked vectors (module docstring of :class:`methods.dobi_svd.DobiIPCAFactorizer`).
        roots: Per window :func:`gram_root` of its Gram (shared by the linears of one input), used
            when ``m > n``; None computes the ``m x m`` eigendecomposition instead.

    Raises:
        ValueError: when all windows together give fewer than ``k`` vectors.
    """
    m, n = weight.shape
    ipca = IncrementalPCA(k, center=center)
    pending: list[Tensor] = []
    rows = 0
    lengths = [max(1, int(t)) for t in window_tokens.tolist()]
    group = max(1, int(min(m, n) / max(1, min(lengths))))
    for s, length in enumerate(lengths):
        q = min(math.ceil(k / gamma_scale(m, n, length) - 1e-9), length, m, n)
        vecs = window_subspace(weight, window_grams[s], q, roots[s] if roots is not None and m > n else None)
        pending.append(vecs.T)
        rows += vecs.shape[1]
        if len(pending) >= group and rows >= k:
            ipca.partial_fit(torch.cat(pending))
            pending, rows = [], 0
    if pending:
        if ipca.components is None and rows < k:
            raise ValueError(f"dobi-ipca: the calibration windows give {rows} singular vectors, fewer than rank {k}; "
                             "use more or longer calibration windows")
        ipca.partial_fit(torch.cat(pending))
    assert ipca.components is not None
    if ipca.components.shape[0] < k:
        raise ValueError(f"dobi-ipca: incremental PCA kept {ipca.components.shape[0]} components, fewer than rank {k}")
    return ipca.components.T.contiguous()


def covariance_basis(weight: Tensor, gram: Tensor, k: int) -> Tensor:
    """Top-``k`` eigenvectors of ``sum_s A_s^T A_s = W H W^T``: ``(m, k)`` float64 (the exact
    top-``k`` output subspace; a streaming accumulation of ``A^T A`` reaches the same matrix)."""
    return window_subspace(weight, gram, k)


def project_factors(weight: Tensor, basis: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``W' = V V^T W`` as a balanced rank-``k`` pair: ``V^T W = P S Q^T``, ``A = V P S^1/2``,
    ``B = S^1/2 Q^T``. Returns ``(A: (m, k), B: (k, n), S: (k,))`` float64."""
    w = weight.to(torch.float64)
    v = basis.to(w)
    p, s, qh = torch.linalg.svd(v.T @ w, full_matrices=False)
    root = s.sqrt()
    a, b = (v @ p) * root[None, :], root[:, None] * qh
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise FloatingPointError("dobi-ipca: non-finite factors")
    return a, b, s
