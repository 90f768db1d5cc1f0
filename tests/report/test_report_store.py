from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from report_fixtures import CELLS, make_record, write_store

from harness.report.metrics import UnknownMetricError, metric_columns, resolve_metric
from harness.report.store import StoreError, load_store, read_records, records_to_frame


def test_load_store_flattens_and_skips_failed(store_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="harness.report.store"):
        frame = load_store(store_dir)
    assert len(frame) == len(CELLS) + 1  # + the --limit record; the failed one is skipped
    assert "adasvd-0.6-0.json" in caplog.text and "OutOfMemoryError" in caplog.text
    row = frame[(frame["method"] == "svd") & (frame["ratio"] == 0.4)].iloc[0]
    assert row["model"] == "toy-llama"
    assert row["wikitext2.ppl"] == pytest.approx(39661.03)
    assert row["zeroshot.tasks.piqa.value"] == pytest.approx(0.51)
    assert row["wikitext2.protocol"] == "wikitext2@2048"
    assert row["calib_samples"] == 32 and row["allocator"] == "uniform" and row["factorizer"] == "plain"
    assert row["seed"] == 0 and not row["limited"]
    assert len(row["layers"]) == 8 * 7
    assert not any(c.startswith("zeroshot.raw") for c in frame.columns)
    limited = frame[frame["limited"]]
    assert list(limited["run_key"]) == ["svd-llm-0.6-0"]


def test_include_failed_keeps_failed_rows(store_dir: Path) -> None:
    frame = load_store(store_dir, include_failed=True)
    assert (frame["status"] == "failed").sum() == 1


def test_invalid_json_names_the_file(tmp_path: Path) -> None:
    write_store(tmp_path, [make_record("svd", 0.2)])
    bad = tmp_path / "sub" / "broken.json"
    bad.parent.mkdir()
    bad.write_text('{"schema_version": 1, "run_key": ')
    with pytest.raises(StoreError, match=r"broken\.json: invalid JSON"):
        load_store(tmp_path)


def test_non_records_and_hidden_files_are_ignored(tmp_path: Path) -> None:
    write_store(tmp_path, [make_record("svd", 0.2)])
    (tmp_path / "spectra.json").write_text(json.dumps([{"layer": "x", "plain": [1.0]}]))
    (tmp_path / ".tmp-abc.json").write_text("{not json")  # an atomic write in progress
    assert len(load_store(tmp_path)) == 1


def test_bad_schema_version_and_missing_fields(tmp_path: Path) -> None:
    rec = make_record("svd", 0.2, schema_version=2)
    write_store(tmp_path, [rec])
    with pytest.raises(StoreError, match="unsupported schema_version 2"):
        read_records(tmp_path)
    rec = make_record("svd", 0.2)
    del rec["ratio"]
    with pytest.raises(StoreError, match="missing required field"):
        records_to_frame([rec])


def test_missing_directory() -> None:
    with pytest.raises(FileNotFoundError):
        load_store("/nonexistent/results")


def test_metric_registry_aliases_and_directions() -> None:
    assert resolve_metric("wikitext2").key == "wikitext2.ppl"
    assert resolve_metric("wikitext2.ppl").label == "WikiText-2"
    assert not resolve_metric("ptb").higher_is_better
    piqa = resolve_metric("piqa")
    assert piqa.key == "zeroshot.tasks.piqa.value" and piqa.higher_is_better and piqa.arrow == "↑"
    assert resolve_metric("zeroshot.average").label == "Average"
    assert resolve_metric("embed-fidelity").key == "embed-fidelity.mean_cos"
    assert not resolve_metric("embed-fidelity.mean_err_norm").higher_is_better
    # Task names only known from the store resolve through the available columns.
    assert resolve_metric("copa", ["zeroshot.tasks.copa.value"]).key == "zeroshot.tasks.copa.value"
    assert resolve_metric("c4").format(39661.03) == "39,661.03"
    assert piqa.format(0.7916) == "79.16"


def test_unknown_metric_suggests_close_names() -> None:
    with pytest.raises(UnknownMetricError, match="Did you mean 'wikitext2'"):
        resolve_metric("wikitxt2")


def test_metric_columns_paper_order(store_dir: Path) -> None:
    cols = metric_columns(load_store(store_dir).columns)
    assert cols[:2] == ["wikitext2.ppl", "ptb.ppl"]
    assert cols[-1] == "zeroshot.average"
    assert cols.index("zeroshot.tasks.openbookqa.value") < cols.index("zeroshot.tasks.piqa.value")
