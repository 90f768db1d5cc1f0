"""The efficiency evaluation: repeat and spread logic on a fake clock, and records through the runner."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from harness.evaluations import efficiency as eff
from harness.evaluations.efficiency import (
    Clock,
    EfficiencyProtocol,
    generation_trial,
    repeat_trials,
    speedup,
    summarize,
    timed,
)


class FakeClock:
    """A clock that only moves when told to; counts synchronisations."""

    def __init__(self) -> None:
        self.t = 100.0
        self.syncs = 0

    def advance(self, seconds: float) -> None:
        self.t += seconds

    def clock(self) -> Clock:
        def sync() -> None:
            self.syncs += 1

        return Clock(now=lambda: self.t, sync=sync)


def test_timed_measures_the_interval_and_syncs_on_both_sides():
    fake = FakeClock()
    result, seconds = timed(lambda: fake.advance(2.5) or "done", fake.clock())
    assert result == "done" and seconds == 2.5 and fake.syncs == 2


def test_repeat_trials_discards_warmups_and_keeps_repeats():
    durations = iter([9.0, 8.0, 1.0, 2.0, 3.0])  # two slow warm-ups, then three kept trials
    calls = []

    def trial() -> tuple[float, float]:
        calls.append(1)
        d = next(durations)
        return d, 10 * d

    assert repeat_trials(trial, warmup=2, repeats=3) == [(1.0, 10.0), (2.0, 20.0), (3.0, 30.0)]
    assert len(calls) == 5


def test_summary_and_spread_of_repeats():
    s = summarize([4.0, 1.0, 2.0, 3.0, 10.0])
    assert (s["n"], s["median"], s["min"], s["max"]) == (5, 3.0, 1.0, 10.0)
    assert s["mean"] == pytest.approx(4.0)
    assert (s["q25"], s["q75"]) == (2.0, 4.0)  # numpy's linear interpolation
    assert s["rel_spread"] == pytest.approx(9.0 / 3.0)
    assert s["stdev"] == pytest.approx(3.5355339, rel=1e-6)
    assert s["repeats"] == [4.0, 1.0, 2.0, 3.0, 10.0]
    one = summarize([2.0])
    assert one["stdev"] == 0.0 and one["rel_spread"] == 0.0
    with pytest.raises(ValueError):
        summarize([])


def test_speedup_is_the_ratio_of_medians_with_an_interquartile_interval():
    dense = [2.0, 2.0, 2.2, 1.8, 2.0]
    comp = [1.0, 1.1, 0.9, 1.0, 1.0]
    s = speedup(dense, comp)
    assert s["speedup"] == pytest.approx(2.0)
    assert s["speedup_low"] == pytest.approx(2.0 / 1.0) and s["speedup_high"] == pytest.approx(2.0 / 1.0)
    noisy = speedup([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 2.0, 2.0, 2.0])
    assert noisy["speedup_low"] == pytest.approx(2.0 / 2.0)
    assert noisy["speedup"] == pytest.approx(3.0 / 2.0)
    assert noisy["speedup_high"] == pytest.approx(4.0 / 1.0)
    assert noisy["speedup_low"] <= noisy["speedup"] <= noisy["speedup_high"]


class Speed(torch.nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor


class FakeLM(torch.nn.Module):
    """Next token = (last token + 1) % vocab; prefill costs 1 ms per token, a decode step 10 ms.

    Checks that every step receives the cache the previous one returned and one new token.
    """

    vocab = 11

    def __init__(self, fake: FakeClock) -> None:
        super().__init__()
        self.fake = fake
        self.steps = 0
        self.tokens: list[int] = []
        self.speed = Speed(1.0)  # a swappable submodule: its ``factor`` scales every cost
        self.config = SimpleNamespace(vocab_size=self.vocab)
        self.prefills: list[float] = []

    def forward(self, input_ids, use_cache, cache=None, logits_to_keep=0):
        assert use_cache and logits_to_keep == 1
        if cache is None:
            self.prefills.append(self.speed.factor)
            self.fake.advance(1e-3 * input_ids.numel() * self.speed.factor)
            cache = 0
            self.steps = 0
        else:
            assert input_ids.shape == (input_ids.shape[0], 1) and cache == self.steps
            self.fake.advance(1e-2 * self.speed.factor)
            self.steps += 1
            self.tokens.append(int(input_ids[0, 0]))
        logits = torch.nn.functional.one_hot((input_ids[:, -1:] + 1) % self.vocab, self.vocab).float()
        return SimpleNamespace(logits=logits, cache=cache + (input_ids.shape[1] == 1))


def test_generation_trial_times_prefill_and_greedy_decode_on_the_cache():
    fake = FakeClock()
    lm = FakeLM(fake)
    ids = torch.tensor([[3, 4, 5, 6], [1, 2, 3, 4]])
    prefill_s, decode_s = generation_trial(lm, ids, 5, fake.clock())
    assert prefill_s == pytest.approx(8e-3) and decode_s == pytest.approx(5e-2)
    assert lm.steps == 5 and lm.tokens == [7, 8, 9, 10, 0]  # greedy continuation of the first row


def test_interleaved_trials_rotate_the_variant_order_and_keep_repeats():
    fake = FakeClock()
    lm = FakeLM(fake)
    variants = {"dense": {"speed": Speed(2.0)}, "half": {"speed": Speed(1.0)}, "quarter": {"speed": Speed(0.5)}}
    proto = EfficiencyProtocol(batch=1, prefill=4, decode=3, warmup=1, repeats=2)
    out = eff.measure_interleaved(lm, variants, torch.device("cpu"), proto, fake.clock())
    # Rounds start one variant later each time: warm-up (2, 1, .5), then (1, .5, 2), (.5, 2, 1).
    assert lm.prefills == [2.0, 1.0, 0.5, 1.0, 0.5, 2.0, 0.5, 2.0, 1.0]
    assert out["dense"]["prefill_s"] == pytest.approx([8e-3, 8e-3])
    assert out["quarter"]["decode_s"] == pytest.approx([1.5e-2, 1.5e-2])
    assert speedup(out["dense"]["decode_s"], out["quarter"]["decode_s"])["speedup"] == pytest.approx(4.0)
    assert lm.speed is variants["dense"]["speed"]  # left with the first variant


def test_protocol_id_and_fitting_to_the_context():
    proto = EfficiencyProtocol()
    assert proto.protocol_id == "efficiency@b1-prefill512-decode64"
    assert proto.fit(None) is proto and proto.fit(8192) is proto
    assert proto.fit(256).protocol_id == "efficiency@b1-prefill192-decode64"
    assert proto.fit(128).protocol_id == "efficiency@b1-prefill96-decode32"
    with pytest.raises(ValueError):
        EfficiencyProtocol(repeats=0)


def test_profiler_peak_follows_allocations_and_frees_in_time_order():
    def ev(start: int, end: int, mem: int) -> SimpleNamespace:
        return SimpleNamespace(time_range=SimpleNamespace(start=start, end=end), self_cpu_memory_usage=mem)

    # alloc 4, alloc 6 (peak 10), free 4, alloc 3 (9), free all; listed out of order.
    events = [ev(5, 6, 3), ev(1, 2, 4), ev(9, 9, -9), ev(2, 3, 6), ev(3, 3, -4)]
    assert eff._profiler_peak(events) == 10


def test_compressed_model_without_a_dense_reference_is_refused(tiny_llama: Path):
    from harness.engine.models import discover, get_module, load_model, set_module
    from methods import LowRankLinear

    model, _ = load_model(str(tiny_llama), "float32")
    name = discover(model).modules[0].name
    lin = get_module(model, name)
    set_module(model, name, LowRankLinear(torch.randn(lin.out_features, 4), torch.randn(4, lin.in_features)))
    with pytest.raises(RuntimeError, match="dense reference"):
        eff.efficiency(model, {}, torch.device("cpu"), EfficiencyProtocol(prefill=8, decode=2, warmup=0, repeats=1))


@pytest.mark.integration
def test_efficiency_records_through_the_runner(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Dense measured once per run; weight bytes fall with the achieved ratio; paths match the ranks."""
    from harness.report.metrics import resolve_metric
    from harness.runs import RunConfig, run
    from tests.utils import CALIB

    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    measured = []
    real_measure = eff.measure

    def counting(model, device, proto, clock=None):
        measured.append(proto.protocol_id)
        return real_measure(model, device, proto, clock)

    monkeypatch.setattr(eff, "measure", counting)
    cfg = RunConfig(model=str(tiny_llama), methods=("svd",), ratios=(0.2, 0.6), evals=("efficiency",), calib=CALIB,
                    calib_samples=4, calib_seqlen=32, device="cpu", results=str(tmp_path / "res"))
    records = [json.loads(p.read_text()) for p in run(cfg)]
    assert len(measured) == 3  # the dense reference once, then each compressed cell
    assert set(measured) == {"efficiency@b1-prefill96-decode32"}  # fitted to the 128-position model
    dense, *cells = records
    assert dense["metrics"]["efficiency"]["prefill"]["speedup"] == 1.0
    by_ratio = sorted(cells, key=lambda r: r["achieved_ratio"])
    bytes_model = [r["metrics"]["efficiency"]["weight_bytes"]["model"] for r in [dense, *by_ratio]]
    bytes_targets = [r["metrics"]["efficiency"]["weight_bytes"]["targets"] for r in [dense, *by_ratio]]
    assert bytes_model == sorted(bytes_model, reverse=True) and len(set(bytes_model)) == 3
    assert bytes_targets == sorted(bytes_targets, reverse=True) and len(set(bytes_targets)) == 3
    for rec in [dense, *cells]:
        m = rec["metrics"]["efficiency"]
        assert m["protocol"] == "efficiency@b1-prefill96-decode32"
        assert m["weight_bytes"]["model"] == 4 * rec["params_model_compressed"]  # float32, tied once
        assert m["weight_bytes"]["targets"] == 4 * rec["params_compressed"]  # no biases in Llama's linears
        assert 1 - m["weight_bytes"]["targets_ratio"] == pytest.approx(rec["achieved_ratio"])
        dense_left = sum(layer["rank"] is None for layer in rec["layers"])
        assert m["paths"].get("dense", 0) == (dense_left if rec["layers"] else 14)
        for phase in ("prefill", "decode"):
            assert m[phase]["seconds"]["n"] == 5 and m[phase]["dense_seconds"]["n"] == 5
            assert m[phase]["speedup_low"] <= m[phase]["speedup"] <= m[phase]["speedup_high"]
            assert "tokens_per_s" not in m[phase]  # CPU: relative figures only
        assert m["peak_prefill_bytes"]["total"] >= m["weight_bytes"]["model"]
    assert resolve_metric("efficiency").higher_is_better and resolve_metric("decode_speedup").key == (
        "efficiency.decode.speedup")
    assert not resolve_metric("efficiency.weight_bytes.model").higher_is_better


def test_efficiency_is_refused_for_encoders():
    from harness.evaluations import preflight

    with pytest.raises(ValueError, match="causal LM"):
        preflight(["efficiency"], encoder=True)


def test_a_basis_sharing_model_is_classified_compressed(tiny_llama: Path):
    """Every registered module type counts as compressed; a shared-basis member once was taken for dense."""
    from harness.engine.models import discover, get_module, load_model, set_module
    from methods.shared_basis import SharedBasis, SharedBasisLinear

    model, _ = load_model(str(tiny_llama), "float32")
    name = discover(model).modules[0].name
    lin = get_module(model, name)
    basis = SharedBasis(torch.randn(4, lin.in_features)).parameter(torch.float32, "cpu")
    set_module(model, name, SharedBasisLinear(basis, torch.randn(lin.out_features, 4)))
    assert eff.forward_path(get_module(model, name)) == "shared-basis"
    assert name in eff.target_modules(model) and f"{name}.second" not in eff.target_modules(model)
    with pytest.raises(RuntimeError, match="dense reference"):
        eff.efficiency(model, {}, torch.device("cpu"), EfficiencyProtocol(prefill=8, decode=2, warmup=0, repeats=1))


ALL_SHARED = "basis-sharing[basis-sharing.shared=q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj]"


@pytest.mark.integration
def test_basis_sharing_cells_are_measured_as_compressed(tiny_llama: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch):
    """Basis-sharing cells run their own measurement: their paths name the shared-basis members and their
    target bytes include each shared basis (once). With every projection shared, no module was of a type
    the efficiency evaluation knew, and the cell was given the dense model's measurement."""
    from harness.runs import RunConfig, run
    from tests.utils import CALIB

    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    measured = []
    real_measure = eff.measure

    def counting(model, device, proto, clock=None):
        measured.append(proto.protocol_id)
        return real_measure(model, device, proto, clock)

    monkeypatch.setattr(eff, "measure", counting)
    cfg = RunConfig(model=str(tiny_llama), methods=("basis-sharing", ALL_SHARED), ratios=(0.4,),
                    evals=("efficiency",), calib=CALIB, calib_samples=4, calib_seqlen=32, device="cpu",
                    results=str(tmp_path / "res"))
    records = {r["method"]["name"]: r for r in (json.loads(p.read_text()) for p in run(cfg))}
    dense = records["dense"]["metrics"]["efficiency"]
    assert len(measured) == 3, "a basis-sharing cell was given the dense reference instead of being measured"
    for name in ("basis-sharing", ALL_SHARED):
        cell = records[name]
        m = cell["metrics"]["efficiency"]
        assert m["paths"].get("shared-basis", 0) > 0, (name, m["paths"])
        assert m["paths"].get("dense", 0) == sum(layer["rank"] is None for layer in cell["layers"]), (name, m["paths"])
        assert sum(m["paths"].values()) == 14  # 2 blocks x 7 target linears, each counted once
        assert m["weight_bytes"]["targets"] == 4 * cell["params_compressed"] < dense["weight_bytes"]["targets"]
        assert m["weight_bytes"]["model"] == 4 * cell["params_model_compressed"]
    assert set(records[ALL_SHARED]["metrics"]["efficiency"]["paths"]) <= {"shared-basis", "dense"}
