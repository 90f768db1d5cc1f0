"""Basis Sharing (Wang et al., ICLR 2025, arXiv 2410.03765): ``basis-sharing`` = uniform + basis-sharing.

Groups of ``g`` consecutive blocks share one basis per shareable projection type (paper Sec. 3.2-3.3,
Eq. 4-6). For the modules ``W_1..W_g: (m, n)`` of one type in one group, with their input Grams
``H_l`` (calibration inputs of the dense model):

    H_G = sum_l H_l = T T^T                          (Cholesky, eigenvalue fallback; float64)
    [W_1; ...; W_g] T = U S V^T                      (stacked: (g m, n))
    B = S_k^{1/2} V_k^T T^{-1}: (k, n)               (shared basis: one parameter for the group)
    C_l = (U_k S_k^{1/2})[rows of layer l]: (m, k)   (per-layer coefficients),  W_l' = C_l B

This minimises ``sum_l ||(W_l - C_l B) X_G||_F`` with every layer's error measured on the group's
pooled inputs (the paper's approximation; each layer's own inputs admit no closed form). The paper
writes the transposed problem (``W_l^T`` concatenated horizontally, ``B = S^{-1} U_k Sigma_k`` on the
input side); the product is the same, and we split ``S_k^{1/2}`` to both factors like SVD-LLM.

Rank: the basis is stored once per group, so at keep ``p`` (the parameter-weighted mean of the
members' keeps) ``k = floor(p g m n / (n + g m))`` (the paper's ``compute_num_basis``); the group
stores ``k (n + g m)``. With ``group_size = 1`` every module is the SVD-LLM truncation, factor for factor.

Shareable types (option ``shared``): the paper shares ``W_Q, W_K, W_V, W_Up, W_Gate`` and keeps
``W_O`` and ``W_Down`` private (their errors grow when shared, Sec. 4). The default names those
projections on Llama-style models, plus ``fc1`` (OPT's up projection) and ``query``/``key``/``value``
(BERT), on every model; a private module is factorized alone with SVD-LLM's truncation. Groups are
aligned to blocks ``[j g, (j + 1) g)``; the last group may be shorter (a group of one is private).

The official configurations (TUDa-HWAI/Basis_Sharing ``tasks/configs``) choose by the attention
layout: multi-head models (Llama-2, LLaMA, OPT) share q, k, v (and up, gate), while the grouped-query
Mistral-7B shares only q, up and gate and keeps k and v private. ``shared=auto`` follows them: on
grouped-query (or multi-query) attention it drops ``k_proj``/``v_proj``/``key``/``value`` from the
default list. The layout is read from the module shapes of each block group
(:func:`grouped_query_attention`: k or v has fewer output rows than q, i.e. ``num_key_value_heads <
num_attention_heads``), so no model config is needed.

Coefficient refit (option ``refit``, off by default): ``dense`` re-solves each member's coefficients
for its own inputs given the basis, ``C_l = W_l H_l B^T (B H_l B^T)^{-1}`` (least squares, never
worse than the joint fit on layer ``l``'s own calibration error). The paper's optional update solves
the same closed form with the Gram of the *compressed* model's inputs; the engine cannot give those
here, because a group's earlier blocks stay dense until the whole group is compressed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods._linalg import Whitening, top_svd, whitened_truncate, whitening
from methods.components import LinearStats, ModuleInfo, check_choices, register
from methods.lowrank import Factorization
from methods.method import rank_for, register_method
from methods.shared_basis import SharedBasis, SharedBasisFactorization

DEFAULT_SHARED = "q_proj|k_proj|v_proj|gate_proj|up_proj|fc1|query|key|value"
AUTO = "auto"
# Under grouped-query attention the official configs keep these private (Mistral-7B: share q, up, gate).
KV_PROJECTIONS = ("k_proj", "v_proj", "key", "value")
QUERY_PROJECTIONS = ("q_proj", "query")
REFITS = ("none", "dense")


def _is(kind: str, names: tuple[str, ...] | list[str]) -> bool:
    """``kind`` (``self_attn.k_proj``) is one of ``names`` or ends with ``.name``."""
    return any(kind == p or kind.endswith("." + p) for p in names)


def grouped_query_attention(modules: list[ModuleInfo]) -> bool:
    """True when the attention of these modules has fewer key/value heads than query heads.

    Read from shapes, block by block: a key or value projection with fewer output rows than the
    query projection of its block (``num_key_value_heads * head_dim < num_attention_heads *
    head_dim``). Without a query projection among ``modules`` (a target selection that leaves q out)
    the comparison is against the input width ``hidden``, which the query output equals on
    Llama-style models.
    """
    for block in sorted({m.block for m in modules}):
        mods = [m for m in modules if m.block == block]
        query = next((m.out_features for m in mods if _is(m.kind, QUERY_PROJECTIONS)), None)
        for m in mods:
            if _is(m.kind, KV_PROJECTIONS) and m.out_features < (m.in_features if query is None else query):
                return True
    return False


def shared_rank(m: int, n: int, g: int, keep: float) -> int | None:
    """Rank of a basis shared by ``g`` matrices ``(m, n)`` at ``keep``: ``floor(keep g m n / (n + g m))``,
    or None when sharing would not save storage (the members stay dense)."""
    if keep >= 1.0:
        return None
    k = max(1, math.floor(keep * g * m * n / (n + g * m) + 1e-9))
    return None if k * (n + g * m) >= g * m * n else min(k, n, g * m)


def refit_coefficients(weight: Tensor, basis: Tensor, gram: Tensor) -> Tensor:
    """``C = W H B^T (B H B^T)^{-1}: (m, k)``, the least-squares coefficients of ``W: (m, n)`` on the basis
    ``B: (k, n)`` for inputs with Gram ``H: (n, n)`` (pseudo-inverse when ``B H B^T`` is singular)."""
    w, b, h = weight.to(torch.float64), basis.to(torch.float64), gram.to(torch.float64)
    hb = h @ b.T  # (n, k)
    g = b @ hb
    g = 0.5 * (g + g.T)
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return torch.cholesky_solve((w @ hb).T, chol).T
    return w @ hb @ torch.linalg.pinv(g, hermitian=True)


@register("factorizer")
@dataclass(frozen=True)
class BasisSharingFactorizer:
    """Basis Sharing across groups of consecutive blocks (module docstring).

    Options:
        group_size: Blocks per group (paper: 2; 1 = SVD-LLM).
        shared: ``|``-separated projection names (suffixes of the module's kind) that share bases.
            The default shares q, k, v, gate and up on every model (the paper's Sec. 3-4 and the
            official multi-head configs; our choice on grouped-query models). ``auto`` follows the
            official configs by attention layout: q, k, v, gate, up on multi-head attention; q, gate,
            up with k and v private on grouped-query attention (their Mistral-7B configs).
        refit: ``none`` (paper default) or ``dense`` (per-layer least-squares coefficients).
    """

    name: ClassVar[str] = "basis-sharing"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"refit": REFITS}
    group_size: int = 2
    shared: str = DEFAULT_SHARED
    refit: str = "none"

    def __post_init__(self) -> None:
        check_choices(self)
        if self.group_size < 1:
            raise ValueError(f"basis-sharing.group_size must be >= 1, got {self.group_size}")

    @property
    def block_group(self) -> int:
        return self.group_size

    def shared_names(self, grouped_query: bool = False) -> list[str]:
        """The projection names that share bases (``auto`` resolved for the attention layout)."""
        if self.shared == AUTO:
            names = DEFAULT_SHARED.split("|")
            return [p for p in names if p not in KV_PROJECTIONS] if grouped_query else names
        return [p for p in self.shared.split("|") if p]

    def shares(self, kind: str, grouped_query: bool = False) -> bool:
        """Whether modules of ``kind`` share bases (``grouped_query``: the layout ``auto`` reads)."""
        return _is(kind, self.shared_names(grouped_query))

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization:
        """A private module: SVD-LLM's whitened truncation."""
        white = stats.whitening()
        a, b, s = whitened_truncate(weight, white, rank)
        return Factorization(a, b, spectrum=s, info=_white_info(white))

    def factorize_blocks(self, members: list[tuple[ModuleInfo, Tensor, LinearStats, float]]) -> dict[str, object]:
        """Factors of every module of one block group (:class:`methods.components.BlockGroupFactorizer`)."""
        out: dict[str, object] = {}
        by_kind: dict[str, list[tuple[ModuleInfo, Tensor, LinearStats, float]]] = {}
        gqa = self.shared == AUTO and grouped_query_attention([mod for mod, *_ in members])
        for mod, weight, stats, keep in members:
            if self.shares(mod.kind, gqa):
                by_kind.setdefault(mod.kind, []).append((mod, weight, stats, keep))
            else:
                out[mod.name] = self._private(weight, stats, keep)
        whites: dict[tuple[int, ...], Whitening] = {}  # q/k/v of the same blocks pool the same Grams
        for group in by_kind.values():
            if len(group) == 1:
                _, weight, stats, keep = group[0]
                out[group[0][0].name] = self._private(weight, stats, keep)
            else:
                out.update(self._shared(group, whites))
        return out

    def _private(self, weight: Tensor, stats: LinearStats, keep: float) -> Factorization | None:
        rank = rank_for(*weight.shape, keep)
        return None if rank is None else self.factorize(weight, stats, rank)

    def _shared(self, group: list[tuple[ModuleInfo, Tensor, LinearStats, float]],
                whites: dict[tuple[int, ...], Whitening]) -> dict[str, SharedBasisFactorization | None]:
        shapes = {tuple(w.shape) for _, w, _, _ in group}
        if len(shapes) != 1:
            raise ValueError(f"basis-sharing: modules {[m.name for m, *_ in group]} differ in shape {sorted(shapes)}")
        (m, n), g = shapes.pop(), len(group)
        keep = sum(k for *_, k in group) / g  # one shape: the parameter-weighted mean is the mean
        k = shared_rank(m, n, g, keep)
        if k is None:
            return {mod.name: None for mod, *_ in group}
        key = tuple(id(st.gram) for _, _, st, _ in group)
        if key not in whites:
            whites[key] = whitening(torch.stack([st.gram.to(torch.float64) for _, _, st, _ in group]).sum(0))
        white = whites[key]
        stacked = torch.cat([w.to(torch.float64) for _, w, _, _ in group], dim=0)  # (g m, n)
        u, s, vh = top_svd(stacked @ white.factor, k)
        root = s[:k].sqrt()
        basis = white.right_solve(root[:, None] * vh)  # (k, n)
        coeffs = list((u * root).split(m, dim=0))  # g x (m, k)
        if self.refit == "dense":
            coeffs = [refit_coefficients(w, basis, st.gram) for _, w, st, _ in group]
        shared = SharedBasis(basis)
        names = [mod.name for mod, *_ in group]
        info = {"shared_with": names, "shared_rank": k, **_white_info(white)}
        return {mod.name: SharedBasisFactorization.member(c, shared, counts_basis=i == 0, spectrum=s, info=info)
                for i, ((mod, *_), c) in enumerate(zip(group, coeffs, strict=True))}


def _white_info(white: Whitening) -> dict[str, object]:
    info: dict[str, object] = {"whitening": white.method}
    if white.method != "cholesky":
        info["clamped_eigenvalues"] = white.clamped
    return info


register_method("basis-sharing", "uniform", "basis-sharing")
