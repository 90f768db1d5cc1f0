"""Seed replicates in every report: mean ± sample standard deviation, the tie rule, one seed, error bars."""

from __future__ import annotations

import logging
import math
import statistics
from typing import Any

import pandas as pd
import pytest
from report_fixtures import make_record
from test_report_leaderboard import md_header, md_rows

from harness.report.leaderboard import build_leaderboard, render_leaderboard
from harness.report.metrics import resolve_metric
from harness.report.spread import (
    SPREAD_NAME,
    TIE_MARK,
    best_and_ties,
    displayed,
    estimate,
    format_estimate,
)
from harness.report.store import records_to_frame

WT2 = resolve_metric("wikitext2")
PIQA = resolve_metric("piqa")


def _records(cells: dict[tuple[str, float], list[float]], key: str = "metrics__wikitext2__ppl") -> list[dict[str, Any]]:
    """One record per (method, ratio, seed index), with the given perplexities (seed i = i-th value)."""
    recs = [make_record("dense", 0.0)]
    for (method, ratio), values in cells.items():
        recs += [make_record(method, ratio, seed, **{key: v}) for seed, v in enumerate(values)]
    return recs


def _wt2(cells: dict[tuple[str, float], list[float]]) -> str:
    return render_leaderboard(records_to_frame(_records(cells)), "md", metrics=["wikitext2"])


def _cell(text: str, label: str) -> str:
    return next(r[3] for r in md_rows(text) if r[1] == label)


def test_estimate_is_mean_and_sample_standard_deviation() -> None:
    est = estimate([10.0, 10.4, 10.8])
    assert est.n == 3 and est.mean == pytest.approx(10.4)
    assert est.spread == pytest.approx(statistics.stdev([10.0, 10.4, 10.8])) == pytest.approx(0.4)
    assert estimate([13.11, 13.31]).spread == pytest.approx(0.1414213562)  # n - 1 in the denominator
    one = estimate([7.94])
    assert one.n == 1 and one.mean == 7.94 and one.spread is None  # no spread is invented
    assert estimate([None, math.nan]).n == 0
    diverged = estimate([10.0, math.inf])
    assert diverged.mean == math.inf and diverged.spread is None and not diverged.has_value
    assert format_estimate(WT2, est) == "10.40 ± 0.40" and format_estimate(WT2, one) == "7.94"
    assert format_estimate(PIQA, estimate([0.70, 0.72])) == "71.00 ± 1.41"  # accuracy and spread in %
    assert displayed(PIQA, estimate([0.70, 0.72])) == (71.0, 1.41)


def test_tie_rule_on_printed_numbers() -> None:
    # Lower is better: b is best; a's interval 10.40 ± 0.40 reaches 10.10, so a ties; c does not.
    marks = best_and_ties(WT2, {"a": estimate([10.0, 10.4, 10.8]), "b": estimate([10.1]), "c": estimate([11.0])})
    assert marks == {"a": "tie", "b": "best tie", "c": ""}
    marks = best_and_ties(WT2, {"a": estimate([10.0, 10.4, 10.8]), "b": estimate([9.9]), "c": estimate([11.0])})
    assert marks == {"a": "", "b": "best", "c": ""}  # 10.40 - 9.90 = 0.50 > 0.40 + 0
    # Exactly touching intervals count as overlapping: |10.40 - 10.00| = 0.40 = 0.40 + 0.
    assert best_and_ties(WT2, {"a": estimate([10.0, 10.4, 10.8]), "b": estimate([10.0])})["a"] == "tie"
    # Single seeds have no spread: different printed values never tie, equal ones are all best.
    assert best_and_ties(WT2, {"a": estimate([10.0]), "b": estimate([10.01])}) == {"a": "best", "b": ""}
    assert best_and_ties(WT2, {"a": estimate([10.0]), "b": estimate([10.001])}) == {"a": "best", "b": "best"}
    # Higher is better for accuracies; a lone entry is not the best of anything.
    assert best_and_ties(PIQA, {"a": estimate([0.70]), "b": estimate([0.68, 0.70])}) == {"a": "best tie", "b": "tie"}
    assert best_and_ties(WT2, {"a": estimate([10.0]), "b": estimate([])}) == {"a": "", "b": ""}


def test_a_perplexity_spread_reaching_below_one_is_judged_on_the_log_scale() -> None:
    # SmolLM2's FWSVD at 0.4: three collapsed seeds, mean ± s = 28,029,323 ± 45,337,024 reaches below
    # 1 and so "overlaps" AdaSVD's 131; on ln ppl (15.66 ± 2.18 against 4.88 ± 0.04) it is far off.
    collapsed, good = estimate([2358769.06, 1352415.77, 80376784.67]), estimate([125.0, 131.0, 137.5])
    assert displayed(WT2, collapsed)[0] - displayed(WT2, collapsed)[1] < 1
    assert best_and_ties(WT2, {"fwsvd": collapsed, "adasvd": good}) == {"fwsvd": "", "adasvd": "best"}
    # Two skewed entries whose ln ppl intervals overlap still tie.
    assert best_and_ties(WT2, {"a": estimate([2.0e6, 1.0e6, 8.0e7]), "b": estimate([1.5e6, 3.0e6, 2.0e7])}) \
        == {"a": "tie", "b": "best tie"}
    # Accuracies keep the printed-number rule whatever their spread.
    assert best_and_ties(PIQA, {"a": estimate([0.1, 0.9]), "b": estimate([0.95])})["a"] == "tie"


def test_leaderboard_mean_spread_and_n() -> None:
    text = _wt2({("svd-llm", 0.4): [10.0, 10.4, 10.8], ("svd", 0.4): [30.0]})
    assert md_header(text)[:4] == ["Ratio", "Method", "n", "WikiText-2↓"]
    rows = {r[1]: r for r in md_rows(text)}
    assert rows["SVD-LLM"][2:] == ["3", "**10.40 ± 0.40**"]
    assert rows["SVD"][2:] == ["1", "30.00"]
    assert SPREAD_NAME in text and "n = 1: a single seed, no spread" in text
    table = build_leaderboard(records_to_frame(_records({("svd-llm", 0.4): [10.0, 10.4, 10.8]})))[0]
    i = table.rows.index[table.rows["method"] == "svd-llm"][0]
    assert table.rows.at[i, "seeds"] == ["0", "1", "2"]
    assert table.spread.at[i, "wikitext2.ppl"] == pytest.approx(0.4)
    assert table.counts.at[i, "wikitext2.ppl"] == 3


def test_leaderboard_marks_a_tie_inside_the_spread_and_none_outside() -> None:
    inside = _wt2({("svd-llm", 0.4): [10.0, 10.4, 10.8], ("adasvd", 0.4): [10.1], ("svd", 0.4): [30.0]})
    assert _cell(inside, "SVD-LLM") == f"**10.40 ± 0.40**{TIE_MARK}"
    assert _cell(inside, "AdaSVD") == f"**10.10**{TIE_MARK}"
    assert _cell(inside, "SVD") == "30.00"
    assert "tie: within the seed spread of the best" in inside
    outside = _wt2({("svd-llm", 0.4): [10.0, 10.4, 10.8], ("adasvd", 0.4): [9.9], ("svd", 0.4): [30.0]})
    assert _cell(outside, "SVD-LLM") == "10.40 ± 0.40"
    assert _cell(outside, "AdaSVD") == "**9.90**"
    assert TIE_MARK not in "".join(c for r in md_rows(outside) for c in r)


def test_single_seed_tables_show_no_spread_and_no_tie() -> None:
    frame = records_to_frame(_records({("svd-llm", 0.4): [10.0], ("adasvd", 0.4): [10.1], ("svd", 0.4): [30.0]}))
    text = render_leaderboard(frame, "md", metrics=["wikitext2"])
    body = "".join(c for r in md_rows(text) for c in r)
    assert "±" not in body and TIE_MARK not in body
    assert "n = 1: a single seed, no spread" in text and "sample standard deviation" not in text
    assert _cell(text, "SVD-LLM") == "**10.00**" and _cell(text, "AdaSVD") == "10.10"
    csv = pd.read_csv(pd.io.common.StringIO(render_leaderboard(frame, "csv", metrics=["wikitext2"])))
    assert csv["wikitext2.ppl.std"].isna().all() and set(csv["wikitext2.ppl.n"]) == {1}


def test_csv_and_latex_carry_spread_and_marks() -> None:
    frame = records_to_frame(_records({("svd-llm", 0.4): [10.0, 10.4, 10.8], ("adasvd", 0.4): [10.1]}))
    csv = pd.read_csv(pd.io.common.StringIO(render_leaderboard(frame, "csv", metrics=["wikitext2"])))
    row = csv[csv["method"] == "svd-llm"].iloc[0]
    assert row["wikitext2.ppl"] == pytest.approx(10.4) and row["wikitext2.ppl.std"] == pytest.approx(0.4)
    assert row["wikitext2.ppl.n"] == 3 and row["wikitext2.ppl.mark"] == "tie" and row["seeds"] == "0 1 2"
    assert csv[csv["method"] == "adasvd"].iloc[0]["wikitext2.ppl.mark"] == "best tie"
    tex = render_leaderboard(frame, "latex", metrics=["wikitext2"])
    assert "\\textbf{10.40 $\\pm$ 0.40}$^\\ddagger$" in tex and "$n$" in tex


def test_reruns_of_one_seed_are_not_extra_seeds(caplog: pytest.LogCaptureFixture) -> None:
    recs = _records({("svd-llm", 0.4): [10.0]})
    rerun = make_record("svd-llm", 0.4, 0, metrics__wikitext2__ppl=10.2, run_key="rerun")
    with caplog.at_level(logging.WARNING, logger="harness.report.leaderboard"):
        text = render_leaderboard(records_to_frame([*recs, rerun]), "md", metrics=["wikitext2"])
    assert _cell(text, "SVD-LLM") == "10.10" and md_rows(text)[1][2] == "1"
    assert "re-runs of one seed are averaged" in caplog.text


def test_error_bars_are_the_seed_spread(tmp_path) -> None:
    from harness.report.plots import ERROR_BARS, _metric_vs_ratio, plot

    cells = {("svd-llm", 0.2): [10.0, 10.4, 10.8], ("svd-llm", 0.4): [20.0, 21.0], ("svd", 0.2): [30.0], ("svd", 0.4): [40.0]}
    frame = records_to_frame(_records(cells))
    fig = _metric_vs_ratio(frame, "toy-llama", WT2, "ppl", log_y=True)
    (container,) = fig.axes[0].containers  # one set of bars: svd has a single seed per ratio, so none
    bars = sorted(container.lines[2][0].get_segments(), key=lambda seg: seg[0][0])
    assert [seg[0][0] for seg in bars] == pytest.approx([0.2, 0.4])
    lows, highs = [seg[0][1] for seg in bars], [seg[1][1] for seg in bars]
    assert lows == pytest.approx([10.4 - 0.4, 20.5 - statistics.stdev([20.0, 21.0])])
    assert highs == pytest.approx([10.4 + 0.4, 20.5 + statistics.stdev([20.0, 21.0])])
    svd_line = next(ln for ln in fig.axes[0].lines if ln.get_label() == "SVD")
    assert list(svd_line.get_ydata()) == pytest.approx([30.0, 40.0])
    (_, png) = plot(frame, "ppl-vs-ratio", tmp_path, git_sha="abc")
    from PIL import Image

    with Image.open(png) as im:
        assert im.text["error_bars"] == ERROR_BARS
