"""benchmarks/make_reference_results on a 1-model, 2-method, 1-ratio override of the shipped spec:
sweep into RESULTS, leaderboard.md / .tex / .csv and the HTML site beside the records, PNG + PDF figures.

The perplexity protocol is a named window subset (every 2000th window): a reference build is of
protocols, and the HTML site leaves smoke records (first-N windows) out."""

from __future__ import annotations

import pytest

from benchmarks.make_reference_results import main
from tests.sweep.conftest import records

pytestmark = pytest.mark.integration


def test_make_reference_results_on_a_small_override(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    results, figures = tmp_path / "reference", tmp_path / "figures"
    code = main([
        "--results", str(results), "--figures", str(figures),
        f"models=[{tiny_model}]", "methods=[svd,svd-llm]", "ratios=[0.4]", "seeds=[0]",
        f"calibration.source=file:{tiny_model.parent / 'calib.txt'}", "calibration.samples=8",
        "calibration.seqlen=64", "eval.seqlen=null", "eval.window_stride=2000", "eval.max_windows=null",
        "svd_driver=null",
    ])
    assert code == 0
    assert len(records(results)) == 3  # dense + 2 methods x 1 ratio
    board = (results / "leaderboard.md").read_text()
    assert "SVD-LLM" in board and "40%" in board
    assert "SVD-LLM" in (results / "leaderboard.tex").read_text()
    assert "SVD-LLM" in (results / "leaderboard.csv").read_text()
    assert "SVD-LLM" in (results / "site" / "index.html").read_text()
    made = {p.name for p in figures.iterdir()}
    for kind in ("ppl-vs-ratio", "rank-allocation"):
        assert any(n.startswith(kind) and n.endswith(".pdf") for n in made), made
        assert any(n.startswith(kind) and n.endswith(".png") for n in made), made
