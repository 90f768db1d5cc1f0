"""Stale and failed records are never shown as numbers; first-N-window smoke records are marked."""

from __future__ import annotations

import logging

import pytest
from report_fixtures import make_record
from test_report_leaderboard import md_rows

from harness.report.entries import PARTIAL_MARK, smoke_mask
from harness.report.leaderboard import build_leaderboard, render_leaderboard
from harness.report.staleness import stale_reasons
from harness.report.store import records_to_frame


def _old_default(method: str, ratio: float, seed: int = 0, **kw):
    """A record whose stored config is not what its method name resolves to today."""
    rec = make_record(method, ratio, seed, **kw)
    rec["method"]["config"]["factorizer"] = {"name": "whitened", "retired_option": 3}
    return rec


def test_config_drift_and_other_weights_are_stale() -> None:
    recs = [
        make_record("dense", 0.0),
        make_record("svd-llm", 0.2),
        _old_default("svd", 0.2, run_key="old"),
        make_record("adasvd", 0.2, model__content_hash="sha256:retrained"),
        make_record("my-plugin", 0.2),  # unknown to the installed registry: not judged
    ]
    reasons = stale_reasons(records_to_frame(recs)).tolist()
    assert reasons[0] is None and reasons[1] is None and reasons[4] is None
    assert "resolves to now" in reasons[2] and "'svd'" in reasons[2]
    assert "other weights" in reasons[3] and "sha256:retrained" in reasons[3]
    # An injected registry decides what "now" means (here: nothing is known, so nothing is stale by config).
    assert stale_reasons(records_to_frame(recs[:3]), resolve=lambda name: None).isna().all()


def test_text_tables_leave_stale_records_out(caplog: pytest.LogCaptureFixture) -> None:
    recs = [make_record("dense", 0.0), make_record("svd-llm", 0.2), make_record("svd", 0.2, 0),
            _old_default("svd", 0.2, 1, metrics__wikitext2__ppl=1.0)]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="harness.report.leaderboard"):
        text = render_leaderboard(records_to_frame(recs), "md", metrics=["wikitext2"])
    rows = {r[1]: r for r in md_rows(text)}
    assert rows["SVD"][2:] == ["1", "20,061.46"]  # the stale seed's 1.00 counts nowhere
    assert "stale record" in caplog.text and "resolves to now" in caplog.text


def test_unusable_cells_show_their_status_not_numbers() -> None:
    failed = make_record("adasvd", 0.2, status="failed", error="Traceback\ntorch.OutOfMemoryError: CUDA OOM")
    failed["metrics"] = {}
    recs = [make_record("dense", 0.0), make_record("svd-llm", 0.2), _old_default("svd", 0.2, run_key="old"), failed,
            make_record("ressvd", 0.2, 0), make_record("ressvd", 0.2, 1, status="failed", error="boom")]  # fmt: skip
    (table,) = build_leaderboard(records_to_frame(recs, include_failed=True), metrics=["wikitext2"], include_unusable=True)
    by_method = {r["method"]: i for i, r in table.rows.iterrows()}
    assert table.rows.at[by_method["svd"], "status"] == "stale"
    assert table.cell_text(by_method["svd"], "wikitext2.ppl") == "stale"
    assert table.rows.at[by_method["adasvd"], "status"] == "failed"
    assert table.cell_text(by_method["adasvd"], "wikitext2.ppl") == "failed"
    assert "OutOfMemoryError" in table.rows.at[by_method["adasvd"], "note"]
    # A failed seed beside an ok one: the numbers are the ok seed's, and the row says a seed failed.
    i = by_method["ressvd"]
    assert table.rows.at[i, "status"] == "ok" and table.rows.at[i, "n_seeds"] == 1
    assert "1 failed run(s) (seed 1): boom" in table.rows.at[i, "note"]
    assert [m["status"] for m in table.rows.at[i, "members"]] == ["ok", "failed"]
    assert not table.marks.loc[[by_method["svd"], by_method["adasvd"]]].to_numpy().any()


def test_first_n_window_records_are_marked() -> None:
    recs = [make_record("dense", 0.0, metrics__wikitext2__protocol="wikitext2@2048:first4"),
            make_record("svd", 0.2, metrics__wikitext2__protocol="wikitext2@2048:first4")]  # fmt: skip
    frame = records_to_frame(recs)
    assert frame["partial_windows"].all() and smoke_mask(frame).all() and not frame["limited"].any()
    text = render_leaderboard(frame, "md", metrics=["wikitext2"])
    assert md_rows(text)[1][1] == f"SVD{PARTIAL_MARK}" and "first N windows" in text


def test_a_sweep_failure_without_config_joins_its_cell() -> None:
    """The sweep records failures before the engine ran with config and calibration None."""
    orphan = make_record("svd-llm", 0.2, 1, status="failed", error="worker died", calibration=None)
    orphan["method"]["config"] = None
    orphan["metrics"] = {}
    recs = [make_record("dense", 0.0), make_record("svd-llm", 0.2, 0), orphan]
    (table,) = build_leaderboard(records_to_frame(recs, include_failed=True), metrics=["wikitext2"], include_unusable=True)
    assert list(table.rows["label"]) == ["Original", "SVD-LLM"]  # one row, no "cfg ..." labels
    assert table.rows.at[1, "n_seeds"] == 1 and "seed 1): worker died" in table.rows.at[1, "note"]
    only_failed = [make_record("dense", 0.0), orphan]
    (table,) = build_leaderboard(records_to_frame(only_failed, include_failed=True), include_unusable=True)
    assert table.rows.at[1, "status"] == "failed" and table.rows.at[1, "n_seeds"] == 0
