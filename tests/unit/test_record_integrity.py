"""Records verify themselves (harness/integrity.py): an edited perplexity, ratio or run key is found
by its digest, its key fields and its own nll_sum / parameter counts; leaderboard and compare name the
file and never rank it; every shipped record under results/ still verifies (unsigned, key re-derived)."""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path
from typing import Any

import pytest

from harness.cli import main
from harness.integrity import SIGNED, TAMPERED, UNSIGNED, legacy_key_fields, sign, verify_record, write_record
from harness.records import dense_record, read_record, record_header, run_key
from harness.report.compare import compare
from harness.report.store import load_store

ROOT = Path(__file__).resolve().parents[2]
NLL, TOKENS = 34639.04146132147, 7161


def _fields(method: dict[str, Any], ratio: float, calibration: dict[str, Any] | None) -> dict[str, Any]:
    return {"model": {"id": "tiny", "revision": None, "content_hash": "sha256:abc"}, "dtype": "float32",
            "method": {"name": "dense"} if method["name"] == "dense" else method, "ratio": ratio,
            "calibration": calibration, "evals": ["wikitext2"],
            "eval": {"seqlen": 1024, "max_windows": None, "limit": None, "tasks": None}, "svdbench": "0.1.0"}


def _record(method: str = "svd-llm", ratio: float = 0.4, nll: float = NLL) -> dict[str, Any]:
    """A record as the run loop builds it (key fields, metrics from an nll sum), before signing."""
    block = {"name": method, "config": {} if method == "dense" else {"allocator": {"name": "uniform"}}}
    calib = None if method == "dense" else {"source": "file:x.txt", "samples": 8, "seqlen": 64, "seed": 0,
                                            "token_hash": "sha256:t"}
    fields = _fields(block, 0.0 if method == "dense" else ratio, calib)
    header = record_header(run_key(fields), {"id": "tiny", "name": "tiny", "revision": None, "content_hash": "sha256:abc"},
                           None, {"svdbench_version": "0.1.0", "dtype": "float32", "seed": 0}, block,
                           0.0 if method == "dense" else ratio, calib, key_fields=fields)
    metrics = {"wikitext2": {"protocol": "wikitext2@1024", "ppl": math.exp(nll / TOKENS),
                             "ppl_finite_windows": math.exp(nll / TOKENS), "nll_sum": nll, "tokens": TOKENS,
                             "windows": 7, "nonfinite_windows": 0}}
    rec = dense_record(header, 1000, 1200, metrics, {"placement": "resident"}, {"eval": 1.0}, 1)
    if method != "dense":
        kept = round(1000 * (1 - ratio)) + 3
        rec.update(achieved_ratio=1 - kept / 1000, achieved_ratio_model=1 - (kept + 200) / 1200,
                   params_compressed=kept, params_model_compressed=kept + 200)
    return rec


def _edit(rec: dict[str, Any], **changes: Any) -> dict[str, Any]:
    out = copy.deepcopy(rec)
    for dotted, value in changes.items():
        node = out
        *path, last = dotted.split("__")
        for p in path:
            node = node[p]
        node[last] = value
    return out


def test_a_signed_record_verifies_and_every_edit_is_found() -> None:
    rec = sign(_record())
    assert verify_record(rec).status == SIGNED
    ppl = _edit(rec, metrics__wikitext2__ppl=50.0)
    verdict = verify_record(ppl)
    assert verdict.status == TAMPERED
    assert any("digest" in p for p in verdict.problems)
    assert any("wikitext2.ppl is 50.0 but its nll_sum/tokens give 126.113" in p for p in verdict.problems)
    ratio = verify_record(_edit(rec, ratio=0.6))
    assert ratio.status == TAMPERED and any("ratio is 0.6 but the run key's fields say 0.4" in p for p in ratio.problems)
    key = verify_record(_edit(rec, run_key="0" * 20), "x/" + rec["run_key"] + ".json")
    assert key.status == TAMPERED and any("is not its file name" in p for p in key.problems)
    assert any("not the hash of its key fields" in p for p in key.problems)
    achieved = verify_record(_edit(rec, achieved_ratio=0.5))
    assert any("achieved_ratio is 0.5" in p for p in achieved.problems)


def test_a_storage_ratio_beside_the_parameter_ratio_is_checked_against_its_counts() -> None:
    rec = _record()
    rec.update(storage_compressed=450, achieved_ratio_storage=0.55)
    assert verify_record(sign(rec)).status == SIGNED
    edited = verify_record(_edit(sign(rec), achieved_ratio_storage=0.7))
    assert any("achieved_ratio_storage is 0.7 but storage_compressed/params_dense" in p for p in edited.problems)


def test_unsigned_records_are_checked_as_far_as_their_content_allows() -> None:
    rec = _record()
    rec.pop("key_fields")
    assert verify_record(rec).status == UNSIGNED  # no digest is not a verdict
    edited = verify_record(_edit(rec, metrics__wikitext2__ppl=50.0))
    assert edited.status == TAMPERED and edited.problems == [
        "wikitext2.ppl is 50.0 but its nll_sum/tokens give 126.113"]
    # A run or a sweep knows which cell the file should hold: an edited ratio no longer matches it.
    expected = _fields(rec["method"], 0.4, rec["calibration"])
    moved = verify_record(_edit(rec, ratio=0.6), expected=expected)
    assert moved.status == TAMPERED and any("ratio is 0.6 but this cell is 0.4" in p for p in moved.problems)


def test_every_shipped_record_still_verifies() -> None:
    """Every shipped record verifies: the signed ones (written since digests exist) by their digest and
    key fields, the older unsigned ones by consistency and by re-deriving their keys."""
    files = [p for p in sorted((ROOT / "results").rglob("*.json")) if not p.name.startswith(".")]
    checked = 0
    for path in files:
        rec = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(rec, dict) or "schema_version" not in rec:
            continue
        verdict = verify_record(rec, path)
        assert verdict.status in (SIGNED, UNSIGNED) and not verdict.notes, (path, verdict)
        if verdict.status == UNSIGNED and rec["status"] == "ok":
            assert any(run_key(f) == rec["run_key"] for f in legacy_key_fields(rec))
        checked += 1
    if not checked:
        pytest.skip("no shipped records in this checkout")


def test_a_failed_record_never_replaces_a_finished_one(tmp_path: Path) -> None:
    path = tmp_path / f"{_record()['run_key']}.json"
    ok = _record()
    failed = {**ok, "status": "failed", "error": "boom", "metrics": {}}
    assert write_record(path, ok)
    assert not write_record(path, failed)
    assert read_record(path)["status"] == "ok"
    path.write_text(json.dumps(_edit(sign(ok), metrics__wikitext2__ppl=50.0)))  # a tampered ok record
    assert write_record(path, failed)  # replaces it, after keeping it aside as evidence
    assert read_record(path)["status"] == "failed"
    assert len(list(tmp_path.glob(f"{path.name}.corrupt-*"))) == 1


def _store(tmp_path: Path, name: str, edits: dict[str, Any] | None = None) -> tuple[Path, Path]:
    """A store of a dense and a compressed signed record; ``edits`` applied to the compressed one after signing."""
    folder = tmp_path / name
    folder.mkdir()
    for rec in (_record("dense"), _record("svd-llm", 0.4, nll=NLL * 1.2)):
        signed = sign(rec)
        if edits and rec["method"]["name"] != "dense":
            signed = _edit(signed, **edits)
        (folder / f"{rec['run_key']}.json").write_text(json.dumps(signed))
    return folder, folder / f"{_record('svd-llm', 0.4)['run_key']}.json"


@pytest.mark.parametrize("edits", [{"metrics__wikitext2__ppl": 50.0}, {"ratio": 0.6}, {"run_key": "0123456789abcdef0123"}],
                         ids=["perplexity", "ratio", "key"])
def test_leaderboard_and_compare_name_a_tampered_record_and_never_rank_it(tmp_path, caplog, capsys, edits) -> None:
    baseline, _ = _store(tmp_path, "baseline")
    results, victim = _store(tmp_path, "results", edits)
    with caplog.at_level(logging.ERROR):
        frame = load_store(results)
    assert set(frame["method"]) == {"dense"}  # the tampered record is no row
    assert f"tampered record {victim}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        assert main(["leaderboard", str(results)]) == 0
    table = capsys.readouterr().out
    assert "svd-llm" not in table and "50.0" not in table
    assert str(victim) in caplog.text
    result = compare(results, baseline)
    assert result.exit_code == 1 and result.summary().startswith("FAIL")
    notes = " ".join(result.table["note"])
    assert f"results record {victim} is tampered" in notes
    assert main(["compare", str(results), "--baseline", str(baseline)]) == 1


def test_an_export_manifest_in_the_results_tree_is_not_a_record(tmp_path: Path) -> None:
    results, _ = _store(tmp_path, "results")
    export = results / "exports" / "0123456789abcdef0123"
    export.mkdir(parents=True)
    (export / "svdbench.json").write_text(json.dumps({"format": "svdbench-lowrank", "format_version": 1,
                                                      "run_key": "0123456789abcdef0123", "method": {"name": "svd"}}))
    (export / "config.json").write_text(json.dumps({"model_type": "llama"}))
    frame = load_store(results)
    assert sorted(frame["method"]) == ["dense", "svd-llm"] and set(frame["integrity"]) == {SIGNED}
    assert main(["leaderboard", str(results)]) == 0
