"""Basis Sharing on random tensors: group size 1 is SVD-LLM, a shared basis is one parameter counted
once, the group rank formula, the joint fit's exact error and the per-layer refit."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from methods import ModuleInfo, parse_method
from methods._linalg import output_error, whitened_truncate, whitening
from methods.basis_sharing import (
    DEFAULT_SHARED,
    BasisSharingFactorizer,
    grouped_query_attention,
    refit_coefficients,
    shared_rank,
)
from methods.components import LinearStats
from methods.method import rank_for
from methods.shared_basis import SharedBasisFactorization, SharedBasisLinear
from methods.svd_llm import WhitenedFactorizer

SHAPES = {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (16, 32), "self_attn.o_proj": (32, 32),
          "mlp.up_proj": (64, 32), "mlp.down_proj": (32, 64)}


def _members(blocks: int, keep: float, seed: int = 0) -> list[tuple[ModuleInfo, torch.Tensor, LinearStats, float]]:
    """Every module of ``blocks`` blocks; q/k share one Gram per block, as in the engine."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in range(blocks):
        grams = {}
        for kind, (m, n) in SHAPES.items():
            source = "down" if kind.endswith("down_proj") else ("o" if "o_proj" in kind else kind.split(".")[0])
            if source not in grams:
                x = torch.randn(200, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, n, dtype=torch.float64)
                grams[source] = LinearStats(x.T @ x, 200)
            out.append((ModuleInfo(f"layers.{b}.{kind}", b, kind, m, n),
                        torch.randn(m, n, generator=g, dtype=torch.float64), grams[source], keep))
    return out


def test_group_size_one_is_svd_llm_factor_for_factor():
    f = BasisSharingFactorizer(group_size=1)
    assert parse_method("basis-sharing[basis-sharing.group_size=1]").block_group == 1
    for mod, w, st, keep in _members(2, 0.6):
        k = rank_for(mod.out_features, mod.in_features, keep)
        ours, v1 = f.factorize(w, st, k), WhitenedFactorizer().factorize(w, st, k)
        assert torch.equal(ours.a, v1.a) and torch.equal(ours.b, v1.b)
    # A group of one (the short last group) is private, i.e. the same factors.
    one = _members(1, 0.6)
    facts = BasisSharingFactorizer(group_size=2).factorize_blocks(one)
    for mod, w, st, keep in one:
        a, b, _ = whitened_truncate(w, st.whitening(), rank_for(mod.out_features, mod.in_features, keep))
        assert torch.equal(facts[mod.name].a, a) and torch.equal(facts[mod.name].b, b)


def test_shared_basis_is_one_parameter_counted_once():
    members = _members(2, 0.5)
    facts = BasisSharingFactorizer(group_size=2).factorize_blocks(members)
    q0, q1 = facts["layers.0.self_attn.q_proj"], facts["layers.1.self_attn.q_proj"]
    assert isinstance(q0, SharedBasisFactorization) and q0.shared is q1.shared
    assert q0.counts_basis and not q1.counts_basis
    k = q0.rank
    assert q0.param_count() == k * 32 + 32 * k and q1.param_count() == 32 * k
    mods = nn.ModuleList([f.to_module(torch.zeros(mod.out_features), torch.float32, "cpu")
                          for mod, *_ in members for f in [facts[mod.name]]])
    assert mods[0].basis is mods[5].basis and isinstance(mods[0], SharedBasisLinear)
    bias = sum(mod.out_features for mod, *_ in members)
    assert sum(p.numel() for p in mods.parameters()) == sum(f.param_count() for f in facts.values()) + bias
    # Private projections (o, down) own their factors.
    assert not isinstance(facts["layers.0.self_attn.o_proj"], SharedBasisFactorization)
    x = torch.randn(3, 32)
    torch.testing.assert_close(mods[0](x), x @ q0.dense().float().T, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep", [0.3, 0.5, 0.8])
def test_group_rank_counts_the_basis_once_and_hits_the_keep_within_one_rank_step(keep):
    members = _members(2, keep)
    facts = BasisSharingFactorizer(group_size=2).factorize_blocks(members)
    dense = sum(mod.params for mod, *_ in members)
    stored = sum(f.param_count() if f is not None else mod.params for (mod, *_), f in
                 ((m, facts[m[0].name]) for m in members))
    m, n = SHAPES["mlp.up_proj"]
    assert facts["layers.0.mlp.up_proj"].rank == shared_rank(m, n, 2, keep) == math.floor(keep * 2 * m * n / (n + 2 * m))
    # One rank step per group (n + g m) or per private module (m + n).
    step = sum((n + 2 * m) if k in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj") else 2 * (m + n)
               for k, (m, n) in SHAPES.items()) / dense
    assert keep - step <= stored / dense <= keep
    assert shared_rank(32, 32, 2, 1.0) is None  # keep 1: the members stay dense


def test_joint_fit_error_is_the_dropped_spectrum_on_pooled_inputs():
    members = [m for m in _members(2, 0.4) if m[0].kind == "mlp.up_proj"]
    facts = BasisSharingFactorizer(group_size=2).factorize_blocks(members)
    pooled = members[0][2].gram + members[1][2].gram
    err2 = sum(output_error(w, facts[mod.name].dense(), pooled) ** 2 for mod, w, _, _ in members)
    f0 = facts[members[0][0].name]
    assert err2 == pytest.approx(float(f0.spectrum[f0.rank:].pow(2).sum()), rel=1e-7)
    # The same truncation through the stacked whitened matrix: best joint rank-k fit.
    stacked = torch.cat([w for _, w, _, _ in members])
    s = torch.linalg.svdvals(stacked @ whitening(pooled).factor)
    torch.testing.assert_close(f0.spectrum, s, rtol=1e-9, atol=1e-9)


def test_dense_refit_never_worse_on_each_layers_own_inputs():
    members = _members(2, 0.4, seed=3)
    joint = BasisSharingFactorizer(group_size=2).factorize_blocks(members)
    refit = BasisSharingFactorizer(group_size=2, refit="dense").factorize_blocks(members)
    for mod, w, st, _ in members:
        before = output_error(w, joint[mod.name].dense(), st.gram)
        assert output_error(w, refit[mod.name].dense(), st.gram) <= before * (1 + 1e-9)
    # Exact least squares: the refit's residual is orthogonal to the basis in the H metric.
    mod, w, st, _ = members[0]
    basis = refit[mod.name].b
    c = refit_coefficients(w, basis, st.gram)
    torch.testing.assert_close((w - c @ basis) @ st.gram @ basis.T, torch.zeros(mod.out_features, basis.shape[0],
                               dtype=torch.float64), rtol=0, atol=1e-6 * float(w.abs().max() * st.gram.abs().max()))


def test_shapes_must_agree_and_refiners_are_refused():
    members = _members(2, 0.5)
    mod, w, st, keep = members[0]
    bad = [(mod, w, st, keep), (ModuleInfo("layers.1.self_attn.q_proj", 1, mod.kind, 16, 32), w[:16], st, keep)]
    with pytest.raises(ValueError, match="differ in shape"):
        BasisSharingFactorizer().factorize_blocks(bad)
    with pytest.raises(ValueError, match="refit them module by module"):
        parse_method("basis-sharing+adacomp")
    assert BasisSharingFactorizer(shared="up_proj").shares("mlp.up_proj")
    assert not BasisSharingFactorizer(shared="up_proj").shares("mlp.gate_proj")
    m = parse_method("basis-sharing")
    assert m.block_group == 2 and m.config()["factorizer"]["refit"] == "none"


# -- shared=auto: the shared projection types follow the attention layout (official configs) --------

MHA = {"self_attn.q_proj": (32, 32), "self_attn.k_proj": (32, 32), "self_attn.v_proj": (32, 32),
       "self_attn.o_proj": (32, 32), "mlp.gate_proj": (64, 32), "mlp.up_proj": (64, 32), "mlp.down_proj": (32, 64)}
GQA = {**MHA, "self_attn.k_proj": (8, 32), "self_attn.v_proj": (8, 32)}  # 4 query heads, 1 key/value head


def _layout_members(shapes: dict[str, tuple[int, int]], blocks: int = 2, keep: float = 0.5):
    """Every module of ``blocks`` blocks of one attention layout; q/k/v and gate/up share a Gram."""
    g = torch.Generator().manual_seed(11)
    out = []
    for b in range(blocks):
        grams: dict[str, LinearStats] = {}
        for kind, (m, n) in shapes.items():
            source = kind if kind.endswith(("o_proj", "down_proj")) else kind.split(".")[0]
            if source not in grams:
                x = torch.randn(200, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2, n, dtype=torch.float64)
                grams[source] = LinearStats(x.T @ x, 200)
            out.append((ModuleInfo(f"layers.{b}.{kind}", b, kind, m, n),
                        torch.randn(m, n, generator=g, dtype=torch.float64), grams[source], keep))
    return out


def _shared_kinds(facts, members) -> set[str]:
    return {mod.kind for mod, *_ in members if isinstance(facts[mod.name], SharedBasisFactorization)}


def test_auto_keeps_k_and_v_private_on_grouped_query_attention():
    members = _layout_members(GQA)
    assert grouped_query_attention([mod for mod, *_ in members])
    auto = parse_method("basis-sharing[basis-sharing.shared=auto]").factorizer
    facts = auto.factorize_blocks(members)
    assert _shared_kinds(facts, members) == {"self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj"}
    # k and v private: each is SVD-LLM's whitened truncation of its own matrix at its own keep.
    for mod, w, st, keep in members:
        if mod.kind in ("self_attn.k_proj", "self_attn.v_proj"):
            a, b, _ = whitened_truncate(w, st.whitening(), rank_for(mod.out_features, mod.in_features, keep))
            assert torch.equal(facts[mod.name].a, a) and torch.equal(facts[mod.name].b, b)
    # The default (ours on GQA) still shares them.
    default = BasisSharingFactorizer().factorize_blocks(members)
    assert {"self_attn.k_proj", "self_attn.v_proj"} <= _shared_kinds(default, members)


def test_auto_shares_q_k_v_gate_up_on_multi_head_attention_like_the_default():
    members = _layout_members(MHA)
    assert not grouped_query_attention([mod for mod, *_ in members])
    facts = BasisSharingFactorizer(shared="auto").factorize_blocks(members)
    expected = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"}
    assert _shared_kinds(facts, members) == expected
    default = BasisSharingFactorizer().factorize_blocks(members)
    for mod, *_ in members:  # on MHA auto is the default, factor for factor
        assert torch.equal(facts[mod.name].a, default[mod.name].a) and torch.equal(facts[mod.name].b, default[mod.name].b)


def test_attention_layout_is_read_from_shapes():
    def mods(shapes):
        return [ModuleInfo(f"layers.0.{k}", 0, k, *s) for k, s in shapes.items()]

    assert grouped_query_attention(mods(GQA)) and not grouped_query_attention(mods(MHA))
    # Gemma-3-like multi-query attention: q wider than the hidden size (4 x 256 > 640), k/v one head.
    gemma = {"self_attn.q_proj": (1024, 640), "self_attn.k_proj": (256, 640), "self_attn.v_proj": (256, 640)}
    assert grouped_query_attention(mods(gemma))
    # Without q among the targets, k/v are compared with the input width; BERT's names are read too.
    assert grouped_query_attention(mods({"self_attn.k_proj": (8, 32), "mlp.up_proj": (64, 32)}))
    assert not grouped_query_attention(mods({"attention.self.query": (32, 32), "attention.self.key": (32, 32)}))
    names = BasisSharingFactorizer(shared="auto")
    assert names.shared_names(grouped_query=True) == ["q_proj", "gate_proj", "up_proj", "fc1", "query"]
    assert "|".join(names.shared_names(grouped_query=False)) == DEFAULT_SHARED
    # auto is a value of the existing option: the default's config (and the shipped run keys) is unchanged.
    assert parse_method("basis-sharing").config()["factorizer"] == {
        "name": "basis-sharing", "group_size": 2, "shared": DEFAULT_SHARED, "refit": "none"}
    assert parse_method("basis-sharing[basis-sharing.shared=auto]").config()["factorizer"]["shared"] == "auto"
