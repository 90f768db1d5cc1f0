"""Paper claims judged on the records: holds / tie / reversed per model, metric and ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from report_fixtures import ppl_record, write_store, zeroshot_record

from harness.cli import main
from harness.report.claims import (
    HOLDS,
    MISSING,
    REVERSED,
    TIE,
    Claim,
    ClaimsSpec,
    check_claims,
    load_claims,
    match_method,
)
from harness.report.store import records_to_frame

SEEDS = (0, 1, 2)


def _ppl(method: str, ppls: tuple[float, ...], model: str = "toy-llama") -> list[dict]:
    recs = []
    for seed, ppl in zip(SEEDS, ppls, strict=False):
        rec = ppl_record(method, 0.2, seed, ppl=ppl)
        rec["model"] = {**rec["model"], "name": model, "id": f"/models/{model}"}
        rec["run_key"] = f"{model}-{rec['run_key']}"
        recs.append(rec)
    return recs


def _spec(*claims: tuple[str, str], models=("toy-llama", "toy-b"), metrics=("wikitext2", "average")) -> ClaimsSpec:
    return ClaimsSpec(tuple(models), tuple(metrics), tuple(Claim(f"{a} beats {b}", "P", a, b) for a, b in claims))


def test_verdicts_follow_the_leaderboard_seed_rule_on_each_model():
    records = (
        _ppl("svd", (100.0, 110.0, 90.0)) + _ppl("svd-llm", (10.0, 10.5, 9.5)) + _ppl("adasvd", (9.9, 10.1, 10.0))
        + _ppl("ressvd", (20.0, 21.0, 19.0))
        + _ppl("svd", (50.0, 51.0, 49.0), "toy-b") + _ppl("svd-llm", (60.0, 61.0, 59.0), "toy-b")
    )
    rows = check_claims(records_to_frame(records), _spec(("svd-llm", "svd"), ("adasvd", "svd-llm"), ("ressvd", "svd-llm")))
    got = {(r.claim.better, r.metric, r.ratio): {m: v.verdict for m, v in r.verdicts.items()} for r in rows}
    assert got == {
        ("svd-llm", "wikitext2", 0.2): {"toy-llama": HOLDS, "toy-b": REVERSED},  # an order that flips between models
        ("adasvd", "wikitext2", 0.2): {"toy-llama": TIE, "toy-b": MISSING},      # overlapping spreads; toy-b lacks adasvd
        ("ressvd", "wikitext2", 0.2): {"toy-llama": REVERSED, "toy-b": MISSING},
    }
    first = rows[0].verdicts["toy-llama"]
    assert first.text() == "holds: 10.00 ± 0.50 vs 100.00 ± 10.00"
    assert rows[0].holds_on() == ["toy-llama"]


def test_zero_shot_claims_use_the_paired_test_over_documents():
    # One seed each, so the seed rule separates any difference; the paired rule decides.
    bits = {"piqa": "1" * 40 + "0" * 60}
    better_by_one_doc = {"piqa": "1" * 41 + "0" * 59}
    better_by_many = {"piqa": "1" * 80 + "0" * 20}
    records = [zeroshot_record("svd", 0.2, bits=bits), zeroshot_record("svd-llm", 0.2, bits=better_by_one_doc),
               zeroshot_record("adasvd", 0.2, bits=better_by_many)]
    rows = check_claims(records_to_frame(records), _spec(("svd-llm", "svd"), ("adasvd", "svd"), models=("toy-llama",)))
    assert [(r.claim.better, r.metric, r.verdicts["toy-llama"].verdict) for r in rows] == [
        ("svd-llm", "average", TIE), ("adasvd", "average", HOLDS)]
    # Both sides single-seed: each value carries the mark, although the table marks the column header.
    assert rows[1].verdicts["toy-llama"].text() == "holds: 80.00° vs 40.00°"


def test_sides_match_option_variants_and_refuse_ambiguity():
    assert match_method("duo-svd", ["duo-svd[a=1]", "svd-llm"]) == "duo-svd[a=1]"
    assert match_method("duo-svd", ["duo-svd", "duo-svd[a=1]"]) == "duo-svd"
    assert match_method("duo-svd", ["svd"]) is None
    with pytest.raises(ValueError, match="several method strings"):
        match_method("duo-svd", ["duo-svd[a=1]", "duo-svd[a=2]"])


def test_claims_file_is_checked_and_the_cli_prints_the_table(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [m]\nmetrics: [wikitext2]\nclaims:\n  - claim: X\n    better: a\n")
    with pytest.raises(ValueError, match="lacks paper, than"):
        load_claims(bad)
    store = write_store(tmp_path / "results", _ppl("svd", (100.0, 110.0, 90.0)) + _ppl("svd-llm", (10.0, 10.5, 9.5)))
    claims = tmp_path / "claims.yaml"
    claims.write_text(json.dumps({"models": ["toy-llama"], "metrics": ["wikitext2"],
                                  "claims": [{"claim": "Whitening rescues SVD", "paper": "SVD-LLM",
                                              "better": "svd-llm", "than": "svd"}]}))
    assert main(["claims", str(claims), str(store)]) == 0
    out = " ".join(capsys.readouterr().out.split())  # tabulate pads the columns
    assert "| Whitening rescues SVD (SVD-LLM) | wikitext2 | 0.2 | holds: 10.00 ± 0.50 vs 100.00 ± 10.00 | toy-llama |" in out
    assert main(["claims", str(claims), str(store), "--format", "csv"]) == 0
    assert "Whitening rescues SVD,SVD-LLM,wikitext2,0.2,toy-llama,holds" in capsys.readouterr().out
