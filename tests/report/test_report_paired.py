"""The paired tie rule of zero-shot columns, per-document data in the store, and mixed record files."""

from __future__ import annotations

import logging
import math
import statistics

import numpy as np
import pytest
from report_fixtures import make_record, ppl_record, zeroshot_record
from test_report_leaderboard import md_header, md_rows

from harness.report.leaderboard import build_leaderboard, render_leaderboard
from harness.report.paired import (
    PAIRED_FALLBACK_NOTE,
    DocScores,
    decode_per_doc,
    entry_docs,
    paired_difference,
)
from harness.report.spread import TIE_MARK
from harness.report.store import flatten_metrics, records_to_frame

CLEAR_A, CLEAR_B = "1" * 160 + "0" * 40, "1" * 100 + "0" * 100  # 80% vs 50% on 200 documents
# 80% vs 50% as well, but on 10 documents that disagree both ways: d = 1,1,1,1,1,0,0,0,-1,-1.
NOISY_A, NOISY_B = "1111111100", "0000011111"


def _docs(**bits: str) -> dict[str, DocScores]:
    """One entry's column data: task -> scores of a single seed."""
    out = {}
    for task, b in bits.items():
        scores = decode_per_doc({"doc_ids": list(range(len(b))), "acc_norm": b}, "acc_norm")
        assert scores is not None
        out[f"zeroshot.tasks.{task}"] = scores
    return out


def test_a_clear_winner_is_separated() -> None:
    diff = paired_difference(_docs(piqa=CLEAR_A), _docs(piqa=CLEAR_B))
    assert diff is not None and diff.diff == pytest.approx(0.3) and diff.n == 200
    d = [1.0] * 60 + [0.0] * 140
    assert diff.se == pytest.approx(statistics.stdev(d) / math.sqrt(200))  # n - 1 in the sd
    assert diff.separated


def test_identical_documents_tie() -> None:
    diff = paired_difference(_docs(piqa=CLEAR_A), _docs(piqa=CLEAR_A))
    assert diff is not None and diff.diff == 0.0 and diff.se == 0.0 and not diff.separated


def test_a_large_but_noisy_difference_on_few_documents_ties() -> None:
    diff = paired_difference(_docs(piqa=NOISY_A), _docs(piqa=NOISY_B))
    assert diff is not None and diff.diff == pytest.approx(0.3)
    d = [1, 1, 1, 1, 1, 0, 0, 0, -1, -1]
    assert diff.se == pytest.approx(statistics.stdev(d) / math.sqrt(10))
    assert 1.96 * diff.se > 0.3 and not diff.separated
    # A single document has no spread to judge by: never separated.
    one = paired_difference(_docs(piqa="1"), _docs(piqa="0"))
    assert one is not None and one.se == math.inf and not one.separated


def test_average_combines_the_task_differences() -> None:
    a, b = _docs(piqa=CLEAR_A, arc_easy=NOISY_A), _docs(piqa=CLEAR_B, arc_easy=NOISY_B)
    piqa = paired_difference(_docs(piqa=CLEAR_A), _docs(piqa=CLEAR_B))
    arc = paired_difference(_docs(arc_easy=NOISY_A), _docs(arc_easy=NOISY_B))
    avg = paired_difference(a, b)
    assert piqa is not None and arc is not None and avg is not None
    assert avg.diff == pytest.approx((piqa.diff + arc.diff) / 2)
    assert avg.se == pytest.approx(math.sqrt(piqa.se**2 + arc.se**2) / 2)
    # Different tasks or documents are no paired comparison.
    assert paired_difference(a, _docs(piqa=CLEAR_B)) is None
    assert paired_difference(_docs(piqa="10"), _docs(piqa="101")) is None


def test_per_doc_decoding_orders_documents_and_refuses_garbage() -> None:
    scores = decode_per_doc({"doc_ids": [8, 0, 4], "acc": "100", "acc_norm": "011"}, "acc")
    assert scores is not None and scores.doc_ids == (0, 4, 8) and list(scores.correct) == [0.0, 0.0, 1.0]
    assert decode_per_doc({"doc_ids": [0, 4], "acc": "10"}, "acc_norm") is None  # no acc_norm for this task
    assert decode_per_doc(None, "acc") is None
    with pytest.raises(ValueError, match="one '0'/'1' per document"):
        decode_per_doc({"doc_ids": [0, 4], "acc": "1"}, "acc")
    with pytest.raises(ValueError, match="including others"):
        decode_per_doc({"doc_ids": [0, 4], "acc": "1x"}, "acc")


def test_entry_docs_average_over_seeds_and_reruns() -> None:
    def row(b: str) -> dict:
        return {"zeroshot.tasks.piqa.value": 0.5, "zeroshot.tasks.piqa.metric": "acc_norm",
                "per_doc": {"zeroshot.tasks.piqa": {"doc_ids": [0, 1, 2, 3], "acc_norm": b}}}  # fmt: skip

    # Seed 0 ran twice (averaged first, one seed), seed 1 once: per document (mean(s0 runs) + s1) / 2.
    docs = entry_docs("zeroshot.tasks.piqa.value", [("0", row("1100")), ("0", row("1000")), ("1", row("1111"))])
    assert docs is not None
    assert list(docs["zeroshot.tasks.piqa"].correct) == pytest.approx([1.0, 0.75, 0.5, 0.5])
    # One record without the data: the entry has none (the seed rule alone decides).
    bare = {k: v for k, v in row("1100").items() if k != "per_doc"}
    assert entry_docs("zeroshot.tasks.piqa.value", [("0", row("1100")), ("1", bare)]) is None
    assert entry_docs("wikitext2.ppl", [("0", row("1100"))]) is None  # not a zero-shot column


def test_per_doc_stays_out_of_the_flattened_columns() -> None:
    rec = zeroshot_record("svd-llm", 0.4, bits={"piqa": "1010"}, every=4)
    flat = flatten_metrics(rec["metrics"])
    assert not any("per_doc" in k for k in flat)
    assert flat["zeroshot.tasks.piqa.value"] == 0.5 and flat["zeroshot.subset.every"] == 4
    frame = records_to_frame([rec, make_record("svd", 0.4)])
    assert not any("per_doc" in c for c in frame.columns if c != "per_doc")
    assert frame.at[0, "per_doc"]["zeroshot.tasks.piqa"]["acc_norm"] == "1010"
    assert frame.at[1, "per_doc"] is None  # an old record: no per-document data


def _dense(*tasks: str, every: int | None = None) -> list[dict]:
    """The dense reference as separate perplexity and zero-shot records, under the methods' protocols."""
    return [ppl_record("dense", 0.0, ppl=5.68), zeroshot_record("dense", 0.0, bits=dict.fromkeys(tasks, "1110"), every=every)]


def _table(recs: list[dict], metrics: list[str] | None = None):
    (table,) = build_leaderboard(records_to_frame(recs), metrics=metrics)
    return table


def _marks(table, key: str) -> dict[str, str]:
    return {table.rows.at[i, "label"]: table.marks.at[i, key] for i in table.rows.index if not table.rows.at[i, "is_dense"]}


def test_perplexity_and_zeroshot_records_of_one_cell_make_one_row(caplog: pytest.LogCaptureFixture) -> None:
    recs = _dense("piqa")
    for seed in (0, 1):
        recs += [ppl_record("svd-llm", 0.4, seed, ppl=10.0 + seed), ppl_record("svd", 0.4, seed, ppl=30.0 + seed)]
        recs += [zeroshot_record("svd-llm", 0.4, seed, bits={"piqa": CLEAR_A}),
                 zeroshot_record("svd", 0.4, seed, bits={"piqa": CLEAR_B})]  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="harness.report.leaderboard"):
        table = _table(recs, ["wikitext2", "piqa"])
    assert "re-runs" not in caplog.text  # two evaluations of one seed are not re-runs
    rows = table.rows[~table.rows["is_dense"]]
    assert list(rows["label"]) == ["SVD", "SVD-LLM"]  # one row per entry, not one per record file
    assert list(rows["n_seeds"]) == [2, 2]
    i = rows.index[rows["method"] == "svd-llm"][0]
    assert table.rows.at[i, "wikitext2.ppl"] == pytest.approx(10.5) and table.counts.at[i, "wikitext2.ppl"] == 2
    assert table.rows.at[i, "zeroshot.tasks.piqa.value"] == pytest.approx(0.8)
    assert table.counts.at[i, "zeroshot.tasks.piqa.value"] == 2
    assert len(table.rows.at[i, "members"]) == 4
    assert _marks(table, "zeroshot.tasks.piqa.value") == {"SVD": "", "SVD-LLM": "best"}


def test_leaderboard_paired_rule_ties_a_noisy_difference_the_seed_rule_separates() -> None:
    recs = _dense("piqa", "arc_easy")
    recs += [zeroshot_record("svd-llm", 0.4, bits={"piqa": CLEAR_A, "arc_easy": NOISY_A}),
             zeroshot_record("svd", 0.4, bits={"piqa": CLEAR_B, "arc_easy": NOISY_B})]  # fmt: skip
    table = _table(recs)
    # Single seeds: 80.00 vs 50.00 is no tie for the seed rule; the documents decide.
    assert _marks(table, "zeroshot.tasks.piqa.value") == {"SVD": "", "SVD-LLM": "best"}
    assert _marks(table, "zeroshot.tasks.arc_easy.value") == {"SVD": "tie", "SVD-LLM": "best tie"}
    # Average: difference 0.3 > 1.96 · SE, SE = sqrt(SE_piqa² + SE_arc²) / 2 ≈ 0.13: separated.
    assert _marks(table, "zeroshot.average") == {"SVD": "", "SVD-LLM": "best"}
    text = render_leaderboard(records_to_frame(recs), "md")
    assert "ARC_e (acc_norm)↑" in md_header(text)
    arc = md_header(text).index("ARC_e (acc_norm)↑")
    assert [r[arc] for r in md_rows(text)[1:]] == [f"**50.00**{TIE_MARK}", f"**80.00**{TIE_MARK}"]
    assert "paired over documents" in text and "1.96·SE" in text and PAIRED_FALLBACK_NOTE not in text


def test_old_records_fall_back_to_the_seed_rule_and_say_so() -> None:
    noisy = _dense("piqa")
    noisy += [zeroshot_record("svd-llm", 0.4, bits={"piqa": NOISY_A}), zeroshot_record("svd", 0.4, bits={"piqa": NOISY_B})]
    for rec in noisy:  # as written before per-document data existed
        for task in rec["metrics"].get("zeroshot", {}).get("tasks", {}).values():
            task.pop("per_doc", None)
    table = _table(noisy, ["piqa"])
    assert _marks(table, "zeroshot.tasks.piqa.value") == {"SVD": "", "SVD-LLM": "best"}
    assert any(PAIRED_FALLBACK_NOTE in n and n.startswith("Zero-shot columns") for n in table.notes)
    assert not any("paired over documents" in n for n in table.notes)
    # One entry with data, one without: the paired rule is stated, and where it could not apply.
    mixed = noisy[:3] + [zeroshot_record("svd", 0.4, bits={"piqa": NOISY_B})]
    table = _table(mixed, ["piqa"])
    assert any("paired over documents" in n for n in table.notes)
    assert any(n.startswith("PIQA (acc_norm): ") and PAIRED_FALLBACK_NOTE in n for n in table.notes)


def test_subset_protocol_and_single_seed_columns_are_marked() -> None:
    recs = _dense("piqa", every=4)
    for method, ppl in (("svd-llm", 10.0), ("svd", 30.0)):
        recs += [ppl_record(method, 0.4, seed, ppl=ppl + seed) for seed in (0, 1, 2)]
    recs += [zeroshot_record("svd-llm", 0.4, bits={"piqa": CLEAR_A}, every=4),
             zeroshot_record("svd", 0.4, bits={"piqa": CLEAR_B}, every=4)]  # fmt: skip
    text = render_leaderboard(records_to_frame(recs), "md", metrics=["wikitext2", "piqa"])
    assert md_header(text)[3:] == ["WikiText-2↓", "PIQA (acc_norm)↑°¶"]
    rows = md_rows(text)
    assert rows[2][2:] == ["3", "**11.00 ± 1.00**", "**80.00**"]  # no per-cell mark: the header says it
    assert "¶ subset protocol zeroshot@lm-eval-0.4.13:every4: documents 0, 4, 8, … of each task only" in text
    assert "° a single seed where the row has more" in text
    from harness.report.leaderboard import _subset_text

    assert _subset_text("zeroshot@lm-eval-0.4.13:docs200") == "200 documents per task, evenly spread over it"
    assert _subset_text("wikitext2@1024:every48") == "windows 0, 48, 96, …"
    # One single-seed value in a column that has spreads elsewhere: marked on the cell.
    recs.append(zeroshot_record("svd-llm", 0.4, 1, bits={"piqa": CLEAR_A}, every=4))
    rows = md_rows(render_leaderboard(records_to_frame(recs), "md", metrics=["wikitext2", "piqa"]))
    assert rows[1][4] == "50.00°" and rows[2][4].startswith("**80.00 ± 0.00 (n=2)**")


def test_method_options_get_a_footnote_not_the_raw_string() -> None:
    method = "asvd[asvd-sensitivity.n_sequences=1,asvd-sensitivity.step=0.2]"
    recs = [make_record("dense", 0.0), make_record("svd", 0.4), make_record(method, 0.4),
            make_record("duo-svd[kl-knapsack.n_sequences=1]", 0.4)]  # fmt: skip
    frame = records_to_frame(recs)
    text = render_leaderboard(frame, "md", metrics=["wikitext2"])
    assert [r[1] for r in md_rows(text)] == ["Original", "SVD", "ASVD¹", "Duo-SVD²"]  # method order kept
    assert f"- ¹ {method}" in text and "- ² duo-svd[kl-knapsack.n_sequences=1]" in text
    tex = render_leaderboard(frame, "latex", metrics=["wikitext2"])
    body = tex[tex.index("\\midrule"):tex.index("\\bottomrule")]
    assert "ASVD$^{1}$" in body and "asvd-sensitivity" not in body and "[" not in body
    assert "asvd[asvd-sensitivity.n\\_sequences=1,asvd-sensitivity.step=0.2]" in tex  # the note under the table


def test_collapsed_perplexities_print_compactly() -> None:
    recs = [make_record("dense", 0.0)]
    recs += [make_record("svd", 0.4, s, metrics__wikitext2__ppl=v) for s, v in enumerate([68_072_000.0, 68_072_700.0])]
    recs += [make_record("svd-llm", 0.4, s, metrics__wikitext2__ppl=v) for s, v in enumerate([13.11, 13.31])]
    text = render_leaderboard(records_to_frame(recs), "md", metrics=["wikitext2"])
    cells = {r[1]: r[3] for r in md_rows(text)}
    assert cells["SVD"] == "6.8e7 ± 4.9e2" and cells["SVD-LLM"] == "**13.21 ± 0.14**"
    assert "6.8e7 = 6.8 × 10⁷" in text
    tex = render_leaderboard(records_to_frame(recs), "latex", metrics=["wikitext2"])
    assert "6.8e7 $\\pm$ 4.9e2" in tex and "68,072" not in tex


def test_site_shows_headers_marks_and_notes(tmp_path) -> None:
    from report_fixtures import write_store

    from harness.report.site.writer import write_site

    recs = [*_dense("piqa", every=4), zeroshot_record("svd-llm", 0.4, bits={"piqa": NOISY_A}, every=4),
            zeroshot_record("svd", 0.4, bits={"piqa": NOISY_B}, every=4)]  # fmt: skip
    index = write_site(write_store(tmp_path / "r", recs), tmp_path / "site", metrics=["piqa"], figures=False)
    page = index.read_text(encoding="utf-8")
    assert "PIQA (acc_norm)↑¶</th>" in page and '<ul class="notes">' in page
    assert "paired over documents" in page and "subset protocol" in page


def test_tie_rule_is_not_fooled_by_sign_or_units() -> None:
    # b better than a on the same documents: the difference is negative, |d| is what counts.
    diff = paired_difference(_docs(piqa=CLEAR_B), _docs(piqa=CLEAR_A))
    assert diff is not None and diff.diff == pytest.approx(-0.3) and diff.separated
    assert np.isclose(diff.se, paired_difference(_docs(piqa=CLEAR_A), _docs(piqa=CLEAR_B)).se)  # type: ignore[union-attr]
