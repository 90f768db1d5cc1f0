"""Duo-SVD column-preserving factorizer (code github.com/Pupu792/CPSVD): trade rank for exact dense columns.

For ``W: (m, n)`` at rank budget ``r`` (storage ``r (m + n)``), some input columns carry much more
output error than others (outlier channels). Giving up ``dr`` ranks frees ``dr (m + n)`` numbers,
enough for ``c`` dense columns of ``m`` numbers each while the rest, ``W[:, rest]: (m, n - c)``, is
factorised at rank ``r' = r - dr``:

    r (m + n) >= r' (m + n - c) + m c   <=>   c = floor(dr (m + n) / (m - r'))          (storage)

We floor (the paper rounds) so the budget is never exceeded; the parameter count is exact.

The columns are chosen by the score ``s_j = ||R[:, j]||^2 H_jj`` with ``R = W - W_r`` the residual of
the rank-r whitened truncation (a column's residual weight energy times its input's second moment).
The kept columns are the top-``c`` by score, so the kept sets are nested in ``c``, which lets one
Cholesky factor of the permuted Gram serve every ``c`` (see :class:`_TradeCurve`).

Two ways to use the kept columns (option ``columns``):

* ``exact`` (the paper): the dense columns are ``W[:, kept]``; the rest is the whitened truncation
  of ``W[:, rest]`` with the principal block ``H[rest, rest]``. Error^2 = ``sum_{i>r'} s_i^2`` of
  ``W_rest T_rest`` with ``T_rest T_rest^T = H[rest, rest]``.
* ``refit`` (ours): the dense columns also absorb the part of the low-rank error that is linear in
  the kept inputs: ``D = W_k + (W_r - A B) H_rk H_kk^{-1}`` (least squares given ``A B``), and the
  low-rank part is whitened with the Schur complement ``H_rr - H_rk H_kk^{-1} H_kr`` (the Gram of
  the rest inputs after projecting out the kept ones). Its error is never above ``exact``'s.

The search over ``dr`` minimises the exact calibration output error ``||(W - W') X||_F``; ``dr = 0``
(no columns) is always a candidate and equals SVD-LLM's whitened truncation, so the result is never
worse than it on the calibration data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from methods._linalg import EIG_FLOOR, Whitening, whitened_truncate, whitening
from methods.components import LinearStats, check_choices, register
from methods.lowrank import Factorization, LowRankLinear
from methods.module_types import register_module_type

log = logging.getLogger(__name__)

GOLDEN = (3.0 - math.sqrt(5.0)) / 2.0  # 0.381966...: the golden-section interior fraction


def columns_for_trade(m: int, n: int, rank: int, traded: int) -> int:
    """Dense columns bought by giving up ``traded`` of ``rank`` ranks at no extra storage.

    ``c = floor(traded (m + n) / (m - (rank - traded)))`` (Duo-SVD's rank trade, floored), so
    ``(rank - traded)(m + n - c) + m c <= rank (m + n)``.
    """
    if traded <= 0:
        return 0
    kept_rank = rank - traded
    return min(n - kept_rank, (traded * (m + n)) // (m - kept_rank))


def column_scores(weight: Tensor, gram: Tensor, approx: Tensor) -> Tensor:
    """``s_j = ||(W - W')[:, j]||^2 H_jj``: residual weight energy times input second moment, ``(n,)``."""
    resid = weight.to(torch.float64) - approx.to(torch.float64)
    return resid.pow(2).sum(dim=0) * gram.to(torch.float64).diagonal()


@dataclass
class ColumnPreservingFactorization:
    """``W'[:, kept] = columns``, ``W'[:, rest] = A B``: the column-preserving factorisation.

    Same interface as :class:`methods.lowrank.Factorization`.

    Attributes:
        a: ``A: (m, r')``.
        b: ``B: (r', n - c)`` acting on ``x[rest_idx]``.
        columns: ``D: (m, c)`` acting on ``x[kept_idx]``.
        kept_idx: ``(c,)`` int64 input indices of the dense columns.
        rest_idx: ``(n - c,)`` int64 input indices of the low-rank part.
        spectrum: Whitened singular values of the low-rank part (of ``W[:, rest] T_rest``).
        info: JSON-able facts (columns, traded rank, error gain, evaluations).
    """

    a: Tensor
    b: Tensor
    columns: Tensor
    kept_idx: Tensor
    rest_idx: Tensor
    spectrum: Tensor | None = None
    info: dict[str, object] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    @property
    def n_columns(self) -> int:
        return int(self.columns.shape[1])

    def dense(self) -> Tensor:
        """``W': (m, n)`` float64."""
        m, n = self.a.shape[0], self.kept_idx.numel() + self.rest_idx.numel()
        out = torch.zeros(m, n, dtype=torch.float64, device=self.a.device)
        out[:, self.kept_idx] = self.columns.double()
        out[:, self.rest_idx] = self.a.double() @ self.b.double()
        return out

    def param_count(self) -> int:
        """``m c + r' (m + n - c)``: stored weights (bias and index buffers excluded)."""
        return int(self.a.numel() + self.b.numel() + self.columns.numel())

    def to_module(self, bias: Tensor | None, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        """Materialise as a :class:`ColumnPreservingLowRank` in the model's dtype and device."""
        def cast(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        return ColumnPreservingLowRank(
            cast(self.columns), cast(self.a), cast(self.b), self.kept_idx, self.rest_idx,
            None if bias is None else cast(bias.detach()),
        )


@register_module_type
class ColumnPreservingLowRank(nn.Module):
    """``y = D x[kept] + A (B x[rest]) + b``; ``D: (out, c)``, ``A: (out, r')``, ``B: (r', in - c)``.

    The dense columns are an ``nn.Linear`` child (``columns``), the low-rank part a
    :class:`LowRankLinear` (``lowrank``, which holds the bias), the index sets are buffers so they
    move with ``.to()`` and are saved in the ``state_dict`` (and counted in stored bytes).
    """

    export_name: ClassVar[str] = "ColumnPreservingLowRank"
    forward_path: ClassVar[str] = "column-preserving"  # index gathers plus three matmuls

    def __init__(
        self, columns: Tensor, a: Tensor, b: Tensor, kept_idx: Tensor, rest_idx: Tensor, bias: Tensor | None = None
    ) -> None:
        super().__init__()
        out_f, c = columns.shape
        if kept_idx.numel() != c or rest_idx.numel() != b.shape[1] or a.shape[0] != out_f:
            raise ValueError("column-preserving shapes disagree")
        self.in_features, self.out_features = c + b.shape[1], out_f
        self.rank, self.n_columns = a.shape[1], c
        self.register_buffer("kept_idx", kept_idx.to(device=columns.device, dtype=torch.long))
        self.register_buffer("rest_idx", rest_idx.to(device=columns.device, dtype=torch.long))
        self.columns = nn.Linear(c, out_f, bias=False, device=columns.device, dtype=columns.dtype)
        with torch.no_grad():
            self.columns.weight.copy_(columns)
        self.lowrank = LowRankLinear(a, b, bias)

    @classmethod
    def from_shape(
        cls,
        in_features: int,
        out_features: int,
        rank: int,
        n_columns: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> ColumnPreservingLowRank:
        """An uninitialised module of the given shape, to load a state dict into.

        Shapes: ``columns.weight: (out, c)``, ``lowrank`` rank ``r'`` on ``in - c`` inputs,
        ``kept_idx: (c,)`` and ``rest_idx: (in - c,)`` int64 buffers. ``device="meta"`` allocates
        nothing (see :meth:`LowRankLinear.from_shape`).
        """
        if not 0 < n_columns < in_features:
            raise ValueError(f"need 0 < n_columns < in_features, got {n_columns} of {in_features}")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod.in_features, mod.out_features, mod.rank, mod.n_columns = in_features, out_features, rank, n_columns
        mod.register_buffer("kept_idx", torch.empty(n_columns, dtype=torch.long, device=device))
        mod.register_buffer("rest_idx", torch.empty(in_features - n_columns, dtype=torch.long, device=device))
        mod.columns = nn.Linear(n_columns, out_features, bias=False, device=device, dtype=dtype)
        mod.lowrank = LowRankLinear.from_shape(in_features - n_columns, out_features, rank, bias, device, dtype)
        return mod

    def export_spec(self) -> dict[str, Any]:
        """``in_features``, ``out_features``, ``rank`` (``r'``), ``n_columns`` (``c``), ``bias``; the inner
        :class:`LowRankLinear` is part of this spec, not a module of its own."""
        # Key order is the export's (manifest bytes, hence checksums, follow it).
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": int(self.rank),
                "n_columns": int(self.n_columns), "bias": self.lowrank.second.bias is not None}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> ColumnPreservingLowRank:
        """:meth:`from_shape` at the shape an :meth:`export_spec` records."""
        return cls.from_shape(int(spec["in_features"]), int(spec["out_features"]), int(spec["rank"]),
                              int(spec["n_columns"]), bool(spec["bias"]), device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.columns(x.index_select(-1, self.kept_idx)) + self.lowrank(x.index_select(-1, self.rest_idx))

    def dense_weight(self) -> Tensor:
        """``W': (out, in)`` float64."""
        out = torch.zeros(self.out_features, self.in_features, dtype=torch.float64, device=self.kept_idx.device)
        out[:, self.kept_idx] = self.columns.weight.double()
        out[:, self.rest_idx] = self.lowrank.dense_weight()
        return out

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, dense_columns={self.n_columns}")


class _TradeCurve:
    """Calibration error of every trade ``dr`` from one Cholesky factor of the permuted Gram.

    ``exact``: order the inputs lowest score first; with ``P H P^T = L L^T`` the rest set of ``c``
    kept columns is the first ``n - c`` and ``L[:n-c, :n-c]`` factors its principal block.
    ``refit``: order highest score first; ``L[c:, c:]`` factors the Schur complement of the kept
    block, and ``H_rk H_kk^{-1} = L[c:, :c] L[:c, :c]^{-1}``.
    When the permuted Gram is not positive definite, each evaluation whitens its block separately
    (eigenvalue fallback of :func:`methods._linalg.whitening`).
    """

    def __init__(self, weight: Tensor, gram: Tensor, order: Tensor, rank: int, mode: str) -> None:
        self.w, self.h, self.rank, self.mode = weight, gram, rank, mode
        self.m, self.n = weight.shape
        self.perm = order if mode == "refit" else order.flip(0)
        hp = gram[self.perm][:, self.perm]
        chol, info = torch.linalg.cholesky_ex(hp)
        ok = int(info) == 0 and bool(chol.diagonal().min() ** 2 >= EIG_FLOOR * hp.diagonal().max())
        self.chol = chol if ok else None
        self.evaluations = 0

    def split(self, c: int) -> tuple[Tensor, Tensor]:
        """``(kept_idx, rest_idx)`` in original input numbering for ``c`` kept columns."""
        if self.mode == "refit":
            return self.perm[:c], self.perm[c:]
        return self.perm[self.n - c:], self.perm[: self.n - c]

    def whitening(self, c: int) -> Whitening:
        """Whitening of the rest inputs (principal block or Schur complement)."""
        kept, rest = self.split(c)
        if self.chol is not None:
            block = self.chol[c:, c:] if self.mode == "refit" else self.chol[: self.n - c, : self.n - c]
            return Whitening(block, "cholesky")
        h_rr = self.h[rest][:, rest]
        if self.mode == "refit" and c > 0:
            h_rk = self.h[rest][:, kept]
            h_rr = h_rr - h_rk @ torch.linalg.pinv(self.h[kept][:, kept], hermitian=True) @ h_rk.T
        return whitening(h_rr)

    def error_sq(self, traded: int) -> float:
        """Squared calibration output error at trade ``traded`` (exact, from whitened spectra)."""
        self.evaluations += 1
        c = columns_for_trade(self.m, self.n, self.rank, traded)
        _, rest = self.split(c)
        s = torch.linalg.svdvals(self.w[:, rest] @ self.whitening(c).factor)
        return float(s[self.rank - traded:].pow(2).sum())

    def build(self, traded: int) -> ColumnPreservingFactorization:
        c = columns_for_trade(self.m, self.n, self.rank, traded)
        kept, rest = self.split(c)
        white = self.whitening(c)
        w_rest = self.w[:, rest]
        a, b, s = whitened_truncate(w_rest, white, self.rank - traded)
        cols = self.w[:, kept].clone()
        if self.mode == "refit":
            resid = w_rest - a @ b  # (m, n - c)
            if self.chol is not None:
                l21, l11 = self.chol[c:, :c], self.chol[:c, :c]
                cols += torch.linalg.solve_triangular(l11, resid @ l21, upper=False, left=False)
            else:
                h_kk = self.h[kept][:, kept]
                cols += resid @ self.h[rest][:, kept] @ torch.linalg.pinv(h_kk, hermitian=True)
        return ColumnPreservingFactorization(a, b, cols, kept.clone(), rest.clone(), s)


def search_trade(f: Callable[[int], float], hi: int, mode: str, grid: int = 8) -> tuple[int, dict[int, float]]:
    """Minimise ``f`` over the integers ``0..hi``; returns ``(argmin, every evaluated value)``.

    Modes:
        ``golden``: discrete golden-section search on ``[0, hi]`` (assumes unimodality, as the
            paper does), about ``log_1.618(hi)`` evaluations.
        ``bracketed``: ``grid`` evenly spaced probes first, then golden-section search between the
            neighbours of the best probe; robust to a curve with more than one dip.
        ``exhaustive``: every value (tests, small matrices).
    ``f(0)`` is always evaluated, so the result is never worse than no trade.
    """
    cache: dict[int, float] = {}

    def ev(x: int) -> float:
        if x not in cache:
            cache[x] = f(x)
        return cache[x]

    def golden(lo: int, up: int) -> None:
        while up - lo > 3:
            step = round(GOLDEN * (up - lo))
            x1, x2 = lo + step, up - step
            if x1 >= x2:
                break
            if ev(x1) <= ev(x2):
                up = x2
            else:
                lo = x1
        for x in range(lo, up + 1):
            ev(x)

    ev(0)
    if hi <= 0:
        return 0, cache
    if mode == "exhaustive":
        for x in range(hi + 1):
            ev(x)
    elif mode == "golden":
        golden(0, hi)
    elif mode == "bracketed":
        points = sorted({round(i * hi / grid) for i in range(grid + 1)})
        best = min(points, key=ev)
        i = points.index(best)
        golden(points[max(i - 1, 0)], points[min(i + 1, len(points) - 1)])
    else:
        raise ValueError(f"unknown search {mode!r}; use golden, bracketed or exhaustive")
    best = min(cache, key=lambda x: (cache[x], x))
    return best, cache


@register("factorizer")
@dataclass(frozen=True)
class ColumnPreservingFactorizer:
    """Duo-SVD column preserving on top of SVD-LLM's whitened truncation.

    Options:
        search: ``bracketed`` (default), ``golden`` (the paper's) or ``exhaustive`` trade search.
        min_gain: Accept a trade only if it lowers the calibration error by more than this
            fraction of the no-trade error (the paper uses 0.01; 0 accepts any improvement).
        columns: ``exact`` (paper: dense columns are the original ones) or ``refit`` (dense
            columns least-squares corrected, low-rank part whitened with the Schur complement).
        max_trade: Largest fraction of the rank budget that may be traded (rank ``r'`` >= 1 always).
        grid: Probes of the ``bracketed`` search.
    """

    name: ClassVar[str] = "column-preserving"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"search": ("bracketed", "golden", "exhaustive"),
                                                     "columns": ("exact", "refit")}
    search: str = "bracketed"
    min_gain: float = 0.0
    columns: str = "exact"
    max_trade: float = 1.0
    grid: int = 8

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0.0 <= self.min_gain < 1.0 or not 0.0 <= self.max_trade <= 1.0 or self.grid < 2:
            raise ValueError("need 0 <= min_gain < 1, 0 <= max_trade <= 1 and grid >= 2")

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization | ColumnPreservingFactorization:
        """Factors of ``W: (m, n)`` with storage at most ``rank (m + n)`` (module docstring).

        Returns a plain :class:`Factorization` identical to SVD-LLM's when no trade is accepted.
        """
        w = weight.to(torch.float64)
        m, n = w.shape
        white = stats.whitening()
        a, b, s = whitened_truncate(w, white, rank)
        info: dict[str, object] = {"whitening": white.method}
        if white.method != "cholesky":
            info["clamped_eigenvalues"] = white.clamped
        base_sq = float(s[rank:].pow(2).sum())
        hi = min(rank - 1, math.floor(self.max_trade * rank))
        if hi <= 0 or base_sq <= 0.0:
            return Factorization(a, b, spectrum=s, info={**info, "columns": 0})
        gram = stats.gram.to(torch.float64)
        order = torch.argsort(column_scores(w, gram, a @ b), descending=True, stable=True)
        curve = _TradeCurve(w, gram, order, rank, self.columns)
        best, seen = search_trade(curve.error_sq, hi, self.search, self.grid)
        # f(0) from the curve equals base_sq up to rounding; compare against the engine's own value.
        gain = 1.0 - math.sqrt(max(seen[best], 0.0) / base_sq)
        info.update(columns=0, traded_rank=0, evaluations=curve.evaluations, best_gain=gain)
        if best == 0 or seen[best] >= base_sq or gain <= self.min_gain:
            return Factorization(a, b, spectrum=s, info=info)
        fact = curve.build(best)
        fact.info = {**info, "columns": fact.n_columns, "traded_rank": best, "rank_budget": rank}
        log.debug("column-preserving %dx%d: rank %d -> %d + %d columns, error -%.2f%%",
                  m, n, rank, fact.rank, fact.n_columns, 100 * gain)
        return fact
