"""ASVD: activation-aware factorizer, the abs-mean statistic and the sensitivity threshold search."""

from __future__ import annotations

import itertools

import pytest
import torch

from methods import ModuleInfo, parse_method
from methods.activation_aware import ActivationAwareFactorizer, channel_scaling, scaled_truncate
from methods.activation_stats import InputAbsMean
from methods.components import AllocationContext, LinearStats
from methods.describe import option_descriptions
from methods.knapsack import option_cost
from methods.sensitivity_threshold import (
    SensitivityThresholdAllocator,
    candidate_grid,
    monotone_envelope,
    threshold_keeps,
)
from methods.statistics import GramProduct
from methods.svd import PlainFactorizer

CPU = torch.device("cpu")


def _layer(seed: int, m: int, n: int) -> tuple[torch.Tensor, LinearStats]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(300, n, generator=g, dtype=torch.float64)
    x[:, :3] *= 20.0  # outlier channels
    return w, LinearStats(x.T @ x, 300, input_abs_mean=x.abs().mean(0))


@pytest.mark.parametrize("m,n,k", [(24, 40, 5), (40, 24, 9), (32, 32, 1)])
def test_alpha_zero_is_plain_svd_bit_for_bit(m, n, k):
    w, st = _layer(m + k, m, n)
    fact = ActivationAwareFactorizer(alpha=0.0).factorize(w, st, k)
    plain = PlainFactorizer().factorize(w, st, k)
    assert torch.equal(fact.a, plain.a) and torch.equal(fact.b, plain.b) and torch.equal(fact.spectrum, plain.spectrum)


def test_scaled_truncation_is_the_truncation_of_w_times_s_undone_on_v():
    w, st = _layer(1, 20, 30)
    s = channel_scaling(st.get("input_abs_mean"), 0.5)
    a, b, sigma = scaled_truncate(w, s, 6)
    u, sv, vh = torch.linalg.svd(w * s, full_matrices=False)
    torch.testing.assert_close((a @ b) * s, (u[:, :6] * sv[:6]) @ vh[:6], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sigma, sv)
    # Scaling by the activations lowers the calibration output error against plain SVD here.
    from methods._linalg import output_error, truncated_svd
    pa, pb, _ = truncated_svd(w, 6)
    assert output_error(w, a @ b, st.gram) < output_error(w, pa @ pb, st.gram)


def test_dead_channel_is_floored_and_non_finite_statistic_is_an_error():
    w, _ = _layer(2, 12, 10)
    dead = torch.ones(10, dtype=torch.float64)
    dead[3] = 0.0
    fact = ActivationAwareFactorizer().factorize(w, LinearStats(input_abs_mean=dead), 4)
    assert torch.isfinite(fact.dense()).all()
    for bad in (torch.full((10,), float("nan"), dtype=torch.float64), torch.zeros(10, dtype=torch.float64)):
        with pytest.raises(FloatingPointError):
            ActivationAwareFactorizer().factorize(w, LinearStats(input_abs_mean=bad), 4)
    with pytest.raises(ValueError, match="input-abs-mean"):
        ActivationAwareFactorizer().factorize(w, LinearStats(), 4)


def test_abs_mean_statistic_counts_real_tokens_only():
    x = torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    acc = InputAbsMean().accumulator(4, CPU, GramProduct())
    acc.add(x[:1], mask[:1], 0)
    acc.add(x[1:], mask[1:], 1)
    torch.testing.assert_close(acc.result()["input_abs_mean"], x[mask].abs().mean(0).double(), rtol=1e-6, atol=1e-7)


# -- threshold search ----------------------------------------------------------------------------

def _modules(blocks: int = 3) -> list[ModuleInfo]:
    shapes = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "gate": (160, 64), "up": (160, 64),
              "down": (64, 160)}
    return [ModuleInfo(f"layers.{b}.{k}", b, k, *s) for b in range(blocks) for k, s in shapes.items()]


def _table(modules, seed: int, noise: float = 0.0, min_keep: float = 0.1) -> dict[str, dict[float, float]]:
    g = torch.Generator().manual_seed(seed)
    keeps = candidate_grid(0.1, min_keep, 0.9)
    out = {}
    for m in modules:
        sens = float(torch.rand(1, generator=g)) * 5 + 0.1
        out[m.name] = {p: 10 + sens * (1 - p) ** 2 + noise * float(torch.rand(1, generator=g)) for p in keeps}
    return out


def test_candidate_grid_is_the_papers():
    assert candidate_grid(0.1, 0.1, 0.9) == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def test_both_candidate_grids_are_reachable_and_documented():
    """Paper era (and the official code until 2024-10-22): 0.1..0.9, the default; official code since: 0.4..0.9."""
    assert SensitivityThresholdAllocator().min_keep == 0.1  # the default is unchanged until it is measured
    official = parse_method("asvd[asvd-sensitivity.min_keep=0.4]").allocator
    assert candidate_grid(official.step, official.min_keep, official.max_keep) == [0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    help_text = option_descriptions(SensitivityThresholdAllocator)
    assert "0.4" in help_text["min_keep"] and "0.1" in help_text["min_keep"] and "2024-10-22" in help_text["min_keep"]
    assert "literal rule" in help_text["monotone"] and "ours" in help_text["monotone"]
    assert "ASVD's code: 0.1" not in (SensitivityThresholdAllocator.__doc__ or "")
    # On the official grid no module keeps less than 40 %, whatever the table says.
    modules = _modules()
    table = _table(modules, seed=3, noise=3.0, min_keep=0.4)
    ctx = AllocationContext(modules, 3, probes={"asvd_sensitivity": lambda keeps, n, f: table},
                            factorizer=ActivationAwareFactorizer())
    keeps = official.allocate(ctx, 0.4)
    assert min(keeps.values()) >= 0.4 and set(keeps.values()) <= {0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0}


def _paper_threshold_rule(modules, table, budget):
    """ASVD's rule restated in perplexity terms (paper Sec. 3.3): a threshold perplexity ``tau`` allows
    every (module, keep) whose measured perplexity is at most ``tau``; each module takes its smallest
    allowed keep (dense when none); the search returns the lowest ``tau`` whose storage fits."""
    best = None
    for tau in sorted({v for row in table.values() for v in row.values()}, reverse=True):
        keeps = {m.name: min([p for p, v in table[m.name].items() if v <= tau], default=1.0) for m in modules}
        if sum(option_cost(m, keeps[m.name]) for m in modules) <= budget:
            best = keeps  # tau descends: the last one that fits is the lowest
    return best


@pytest.mark.parametrize("min_keep", [0.1, 0.4])
@pytest.mark.parametrize("ratio,seed", [(0.2, 1), (0.4, 2), (0.3, 5)])
def test_literal_rule_is_the_papers_threshold_rule_on_noisy_tables(min_keep, ratio, seed):
    """monotone=false on non-monotone (noisy) tables, on both grids: exactly the paper's rule."""
    modules = _modules()
    table = _table(modules, seed=seed, noise=3.0, min_keep=min_keep)
    assert any(row[a] < row[b] for row in table.values() for a, b in itertools.pairwise(sorted(row)))  # not monotone
    budget = (1 - ratio) * sum(m.params for m in modules)
    assert threshold_keeps(modules, table, budget, monotone=False) == _paper_threshold_rule(modules, table, budget)
    # The envelope (ours) is the same rule applied to the envelope tables.
    envelope = {name: monotone_envelope(row) for name, row in table.items()}
    enveloped = threshold_keeps(modules, table, budget, monotone=True)
    assert enveloped == threshold_keeps(modules, envelope, budget, monotone=False)


def test_monotone_envelope_is_non_increasing_and_above_the_table():
    row = {0.1: 5.0, 0.2: 7.0, 0.3: 4.0, 0.4: 4.5}
    env = monotone_envelope(row)
    assert env == {0.1: 7.0, 0.2: 7.0, 0.3: 4.5, 0.4: 4.5}


@pytest.mark.parametrize("ratio,noise", list(itertools.product([0.2, 0.4, 0.6], [0.0, 3.0])))
def test_threshold_fits_the_budget_within_one_candidate_step(ratio, noise):
    modules = _modules()
    table = _table(modules, seed=int(ratio * 10), noise=noise)
    total = sum(m.params for m in modules)
    keeps = threshold_keeps(modules, table, (1 - ratio) * total)
    stored = sum(option_cost(m, keeps[m.name]) for m in modules)
    achieved = 1 - stored / total
    step = max(0.1 * m.params + m.out_features + m.in_features for m in modules) / total  # one candidate step + a rank floor
    assert ratio <= achieved <= ratio + step
    assert len(set(keeps.values())) > 1  # modules of different sensitivity get different keeps


def test_literal_rule_is_the_largest_fitting_threshold():
    """Brute force over every threshold index of ASVD's literal rule agrees with the binary search."""
    modules = _modules(1)
    table = _table(modules, seed=7, noise=3.0)
    total = sum(m.params for m in modules)
    triples = sorted(((v, m.name, p) for m in modules for p, v in table[m.name].items()), key=lambda t: (-t[0], t[2], t[1]))
    budget = 0.5 * total
    best = None
    for t in range(len(triples) + 1):
        keeps = {m.name: 1.0 for m in modules}
        for _, name, p in triples[t:]:
            keeps[name] = min(keeps[name], p)
        if sum(option_cost(m, keeps[m.name]) for m in modules) <= budget:
            best = keeps
    assert threshold_keeps(modules, table, budget, monotone=False) == best


def test_allocator_calls_the_probe_with_the_methods_factorizer():
    modules = _modules()
    seen = {}

    def probe(keeps, n_sequences, factorizer):
        seen.update(keeps=keeps, n=n_sequences, factorizer=factorizer)
        return _table(modules, 0)

    factorizer = ActivationAwareFactorizer()
    ctx = AllocationContext(modules, 3, probes={"asvd_sensitivity": probe}, factorizer=factorizer)
    keeps = SensitivityThresholdAllocator(n_sequences=4).allocate(ctx, 0.4)
    assert seen == {"keeps": candidate_grid(0.1, 0.1, 0.9), "n": 4, "factorizer": factorizer}
    assert set(keeps) == {m.name for m in modules}
    with pytest.raises(RuntimeError, match="asvd_sensitivity"):
        SensitivityThresholdAllocator().allocate(AllocationContext(modules, 3), 0.4)


def test_registry_compositions():
    asvd = parse_method("asvd")
    assert asvd.config()["allocator"]["name"] == "asvd-sensitivity" and asvd.config()["factorizer"]["alpha"] == 0.5
    assert asvd.probes == ("asvd_sensitivity",) and asvd.allocation_uses_calibration
    assert [s.key for s in asvd.statistics()] == ["gram", "input-abs-mean"]
    assert asvd.causal_lm_reasons() and not parse_method("svd-llm+asvd-scaling").causal_lm_reasons()
    assert parse_method("svd-llm+asvd-sensitivity").config()["factorizer"]["name"] == "whitened"
    with pytest.raises(ValueError):
        parse_method("asvd[asvd-scaling.alpha=-1]")
