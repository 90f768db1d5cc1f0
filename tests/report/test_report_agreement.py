"""Rank agreement of two metrics or two models: Spearman's rho, Kendall's tau-b, discordant pairs, CLI."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd
import pytest
from report_fixtures import make_record, write_store

from harness.report.agreement import (
    agreement,
    average_ranks,
    kendall_tau,
    rank_agreement,
    render_agreement,
    spearman_rho,
)
from harness.report.cli import add_report_subcommands
from harness.report.leaderboard import build_leaderboard
from harness.report.store import records_to_frame

METHODS = ("svd", "svd-llm", "adasvd", "ressvd")


def test_average_ranks_share_ties() -> None:
    assert average_ranks([30.0, 10.0, 20.0]) == [3.0, 1.0, 2.0]
    assert average_ranks([1.0, 2.0, 2.0, 3.0]) == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([5.0, 5.0, 5.0]) == [2.0, 2.0, 2.0]


def test_perfect_and_reversed_agreement() -> None:
    x = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert spearman_rho(x, [10.0, 20.0, 30.0, 40.0, 50.0]) == pytest.approx(1.0)
    assert kendall_tau(x, [10.0, 20.0, 30.0, 40.0, 50.0]) == pytest.approx(1.0)
    assert spearman_rho(x, x[::-1]) == pytest.approx(-1.0)
    assert kendall_tau(x, x[::-1]) == pytest.approx(-1.0)
    assert math.isnan(spearman_rho(x, [1.0] * 5)) and math.isnan(kendall_tau(x, [1.0] * 5))
    with pytest.raises(ValueError, match="at least two"):
        spearman_rho([1.0], [1.0])


def test_a_known_small_example_with_ties() -> None:
    # x ranks 1,2,3,4; y ranks 1,3,2,4: one swapped pair of six.
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx((5 - 1) / 6)
    assert spearman_rho([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # 1 - 6Σd²/(n(n²-1)) = 0.8
    # Ties: x = 1,2,2,3 (one tied pair), y = 1,2,3,4. C = 5, D = 0, P = 6, T_x = 1, T_y = 0.
    assert kendall_tau([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(5 / math.sqrt(5 * 6))
    # Spearman with ties: the Pearson correlation of the average ranks (1, 2.5, 2.5, 4) and (1, 2, 3, 4).
    rx, ry = [1, 2.5, 2.5, 4], [1, 2, 3, 4]
    mx, my = 2.5, 2.5
    r = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True)) / math.sqrt(
        sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)
    )
    assert spearman_rho([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(r)


def _records(ppl: dict[str, float], avg: dict[str, float], model: str = "toy-llama", ratio: float = 0.4) -> list[dict]:
    recs = [make_record("dense", 0.0, model__name=model)]
    for m in ppl:
        rec = make_record(m, ratio, model__name=model, metrics__wikitext2__ppl=ppl[m])
        rec["metrics"]["zeroshot"]["average"] = avg[m]
        recs.append(rec)
    return recs


def test_perplexity_against_zero_shot_average_on_one_model() -> None:
    ppl = {"svd": 900.0, "svd-llm": 12.0, "adasvd": 14.0, "ressvd": 13.0}
    avg = {"svd": 0.30, "svd-llm": 0.50, "adasvd": 0.52, "ressvd": 0.45}  # adasvd best by accuracy only
    (table,) = build_leaderboard(records_to_frame(_records(ppl, avg)), metrics=["wikitext2", "average"])
    r = rank_agreement(table, "wikitext2", 0.4, metric_b="average")
    # Best first by perplexity; ranks are 1 = best in each metric's own direction.
    assert r.labels == ["SVD-LLM", "ResSVD", "AdaSVD", "SVD"]
    assert r.ranks_a == [1, 2, 3, 4] and r.ranks_b == [2, 3, 1, 4]
    assert r.discordant == [("SVD-LLM", "AdaSVD"), ("ResSVD", "AdaSVD")]
    assert r.tau == pytest.approx((4 - 2) / 6) and r.rho == pytest.approx(1 - 6 * (1 + 1 + 4) / 60)
    text = r.to_markdown()
    assert "Spearman ρ = 0.40, Kendall τ = 0.33" in text and "SVD-LLM > AdaSVD by A" in text
    # Dense is never ranked; the same order by both metrics is perfect agreement.
    perfect = {"svd": 0.30, "svd-llm": 0.55, "adasvd": 0.45, "ressvd": 0.50}
    (table,) = build_leaderboard(records_to_frame(_records(ppl, perfect)), metrics=["wikitext2", "average"])
    r = rank_agreement(table, "wikitext2", 0.4, metric_b="average")
    assert r.rho == pytest.approx(1.0) and r.tau == pytest.approx(1.0) and r.discordant == []
    assert "Original" not in r.labels


def test_one_metric_on_two_models_matches_methods_by_string() -> None:
    ppl_a = {"svd": 900.0, "svd-llm": 12.0, "adasvd": 14.0, "ressvd": 13.0}
    ppl_b = {"svd": 5000.0, "svd-llm": 30.0, "adasvd": 40.0}  # no ressvd on the second model
    avg = dict.fromkeys(ppl_a, 0.4)
    frame = records_to_frame(_records(ppl_a, avg) + _records(ppl_b, avg, model="other-llm"))
    (result,) = agreement(frame, "wikitext2", models=["toy-llama", "other-llm"])
    assert result.model_b == "other-llm" and result.labels == ["SVD-LLM", "AdaSVD", "SVD"]
    assert result.rho == pytest.approx(1.0) and result.left_out == ["ResSVD"]
    with pytest.raises(ValueError, match="compares two models"):
        agreement(frame, "wikitext2")


def test_render_and_errors() -> None:
    ppl = {"svd": 900.0, "svd-llm": 12.0, "adasvd": 14.0}
    recs = _records(ppl, {"svd": 0.3, "svd-llm": 0.5, "adasvd": 0.4})
    recs += _records({"svd": 2000.0, "svd-llm": 30.0}, {"svd": 0.25, "svd-llm": 0.45}, ratio=0.6)[1:]
    results = agreement(records_to_frame(recs), "wikitext2", "average")
    assert [r.ratio for r in results] == [0.4, 0.6]
    md = render_agreement(results)
    assert md.startswith("| Rankings") and "toy-llama, ratio 40%: WikiText-2↓ vs Average↑" in md
    csv = pd.read_csv(pd.io.common.StringIO(render_agreement(results, "csv")))
    assert list(csv["ratio"]) == [0.4, 0.6] and list(csv["rho"]) == [1.0, 1.0]
    with pytest.raises(ValueError, match="a ranking needs at least two"):
        agreement(records_to_frame(recs), "wikitext2", "average", ratio=0.8)
    with pytest.raises(ValueError, match="md or csv"):
        render_agreement(results, "latex")
    twice = recs + [make_record("svd-llm", 0.4, calibration__samples=256, run_key="other-calib")]
    with pytest.raises(ValueError, match="several entries"):
        agreement(records_to_frame(twice), "wikitext2", "average", ratio=0.4)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="svdbench")
    add_report_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_agreement(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ppl = {"svd": 900.0, "svd-llm": 12.0, "adasvd": 14.0, "ressvd": 13.0}
    store = write_store(tmp_path / "r", _records(ppl, {"svd": 0.3, "svd-llm": 0.5, "adasvd": 0.52, "ressvd": 0.45}))
    assert _run(["leaderboard", str(store), "--agreement", "wikitext2,average", "--ratio", "0.4"]) == 0
    out = capsys.readouterr().out
    assert "| Rankings" in out and "Kendall τ = 0.33" in out
    assert _run(["leaderboard", str(store), "--agreement", "wikitext2,average", "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("model_a,model_b,metric_a,metric_b,ratio,n,rho,tau")
    assert _run(["leaderboard", str(store), "--agreement", "wikitext2,average", "--format", "latex"]) == 2
    assert _run(["leaderboard", str(store), "--agreement", "a,b,c"]) == 2
    assert _run(["leaderboard", str(store), "--ratio", "0.4"]) == 2  # --ratio belongs to --agreement


def test_cli_leaderboard_and_agreement_over_two_models_folders(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    avg = dict.fromkeys(("svd", "svd-llm", "adasvd", "ressvd"), 0.4)
    first = _records({"svd": 900.0, "svd-llm": 12.0, "adasvd": 14.0, "ressvd": 13.0}, avg)
    second = _records({"svd": 5000.0, "svd-llm": 30.0, "adasvd": 25.0, "ressvd": 40.0}, avg, model="other-llm")
    for rec in second:
        rec["run_key"] += "-other"
    store_a = write_store(tmp_path / "a", first)
    store_b = write_store(tmp_path / "b", second + first[:1])  # the first model's dense record in both folders
    argv = ["leaderboard", str(store_a), str(store_b), "--agreement", "wikitext2", "--agreement-models", "toy-llama,other-llm"]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    assert "toy-llama vs other-llm, ratio 40%" in out and "Spearman ρ = 0.40" in out
    assert "Ordered differently: ResSVD > AdaSVD by A, AdaSVD > ResSVD by B; ResSVD > AdaSVD" not in out
    assert "AdaSVD > ResSVD by A" not in out and "ResSVD > AdaSVD by A, AdaSVD > ResSVD by B" in out
    # The dense record found in both folders counts once (n = 1), so no spread is invented for it.
    assert _run(["leaderboard", str(store_a), str(store_b), "--model", "toy-llama", "--format", "csv"]) == 0
    table = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out))
    dense = table[table["method"] == "dense"]
    assert len(dense) == 1 and int(dense["n_seeds"].iloc[0]) == 1 and int(dense["wikitext2.ppl.n"].iloc[0]) == 1
    assert _run(["leaderboard", str(store_a), str(store_b), "--format", "html", "--out", str(tmp_path / "site")]) == 2
