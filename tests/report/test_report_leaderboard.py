from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from report_fixtures import fixture_records, make_record

from harness.report.leaderboard import (
    RATIO_CAPTION,
    LimitedRecordsError,
    build_leaderboard,
    render_leaderboard,
)
from harness.report.metrics import UnknownMetricError
from harness.report.store import load_store, records_to_frame


@pytest.fixture
def frame(clean_store_dir: Path) -> pd.DataFrame:
    return load_store(clean_store_dir)


def md_rows(text: str) -> list[list[str]]:
    """Body rows of the first pipe table in ``text`` (header and alignment rows dropped)."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]


def md_header(text: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith("|"))
    return [c.strip() for c in line.strip("|").split("|")]


def column(text: str, label: str) -> dict[str, str]:
    """Method label -> cell text of the column whose header is ``label``, for the 40% group."""
    idx = md_header(text).index(label)
    rows, group, out = md_rows(text), None, {}
    for r in rows:
        group = r[0] or group
        if group == "40%":
            out[r[1]] = r[idx]
    return out


def test_ordering_dense_first_ratios_ascending_method_order(frame: pd.DataFrame) -> None:
    rows = md_rows(render_leaderboard(frame, "md"))
    assert rows[0][:2] == ["0%", "Original"]
    assert [r[0] for r in rows if r[0]] == ["0%", "20%", "40%"]
    assert [r[1] for r in rows[1:5]] == ["SVD", "SVD-LLM", "AdaSVD", "ResSVD"]
    # Variants come right after their parent, before the next known method.
    assert [r[1] for r in rows[5:]] == ["SVD", "SVD-LLM", "SVD-LLM+adacomp", "AdaSVD", "ResSVD"]
    assert [r[2] for r in rows[5:]] == ["1", "2", "1", "1", "1"]  # n: seeds per cell


def test_unknown_methods_sort_alphabetically_after_known_ones() -> None:
    recs = [make_record(m, 0.2) for m in ("zeta", "svd", "alpha", "duo-svd", "svd-llm")]
    rows = md_rows(render_leaderboard(records_to_frame(recs), "md"))
    assert [r[1] for r in rows] == ["SVD", "SVD-LLM", "Duo-SVD", "alpha", "zeta"]


def test_bold_is_per_group_and_respects_direction(frame: pd.DataFrame) -> None:
    text = render_leaderboard(frame, "md")
    ppl = column(text, "WikiText-2↓")
    assert ppl["SVD-LLM+adacomp"] == "**12.90**"  # lowest perplexity wins
    assert [k for k, v in ppl.items() if v.startswith("**")] == ["SVD-LLM+adacomp"]
    assert column(text, "PTB↓")["AdaSVD"] == "**58.20**"
    piqa = column(text, "PIQA (acc_norm)↑")
    assert piqa["AdaSVD"] == "**66.00**"  # highest accuracy wins
    assert [k for k, v in piqa.items() if v.startswith("**")] == ["AdaSVD"]
    # Equal means as printed are all best (30.50 for both SVD-LLM rows); no tie mark needed.
    assert column(text, "Openb. (acc_norm)↑")["SVD-LLM"] == "**30.50 ± 0.71**"
    assert column(text, "Openb. (acc_norm)↑")["SVD-LLM+adacomp"] == "**30.50**"
    # The dense row has the best numbers of all but is never bold.
    dense = md_rows(text)[0]
    assert dense[3] == "5.68" and not any("**" in c for c in dense)
    table = build_leaderboard(frame)[0]
    assert table.bold.loc[table.rows["is_dense"]].to_numpy().sum() == 0


def test_number_formats_and_caption(frame: pd.DataFrame) -> None:
    text = render_leaderboard(frame, "md")
    assert "39,661.03" in text and "20,061.46" in text  # thousands separators, 2 decimals
    assert md_rows(text)[0][md_header(text).index("PIQA (acc_norm)↑")] == "79.16"  # accuracy as %
    assert "WinoG. (acc)↑" in md_header(text)  # each task names the metric it reports
    assert "Average↑" in md_header(text)
    assert f"**toy-llama**: {RATIO_CAPTION}." in text  # a short caption; rules and marks are notes beneath
    assert text.index("| Ratio") < text.index("- Bold: best per ratio group")
    assert "wikitext2@2048" in text and "zeroshot@lm-eval-0.4.13" in text
    # Mean over seeds 13.11 / 13.31 ± their sample standard deviation 0.1414.
    assert column(text, "WikiText-2↓")["SVD-LLM"] == "13.21 ± 0.14"


def test_latex_booktabs_multirow_bold_and_escaping(frame: pd.DataFrame) -> None:
    recs = [make_record("dense", 0.0), make_record("svd", 0.2), make_record("my_method&co", 0.2)]
    tex = render_leaderboard(records_to_frame(recs), "latex")
    for token in ("\\toprule", "\\midrule", "\\bottomrule", "\\multirow{2}{*}{20\\%}", "\\textbf{"):
        assert token in tex
    assert "my\\_method\\&co" in tex and "ARC\\_e (acc\\_norm)$\\uparrow$" in tex and "WikiText-2$\\downarrow$" in tex
    # Papers' booktabs layout: no vertical rules, perplexities and accuracies under spanning headers.
    assert "\\begin{tabular}{llrrrrrrrrrr}" in tex
    assert "\\multicolumn{2}{c}{Perplexity}" in tex and "\\cmidrule(lr){4-5}\\cmidrule(lr){6-12}" in tex
    full = render_leaderboard(frame, "latex")
    assert "\\multirow{5}{*}{40\\%}" in full and "\\textbf{12.90}" in full and "39,661.03" in full


def test_csv_has_raw_numbers_without_markup(frame: pd.DataFrame) -> None:
    text = render_leaderboard(frame, "csv")
    csv = pd.read_csv(pd.io.common.StringIO(text))
    assert "**" not in text and "wikitext2.ppl" in csv.columns
    row = csv[(csv["method"] == "svd") & (csv["ratio"] == 0.4)].iloc[0]
    assert row["wikitext2.ppl"] == pytest.approx(39661.03)
    assert row["zeroshot.tasks.piqa.value"] == pytest.approx(0.51)  # a fraction, not a percentage
    assert list(csv["method"][:1]) == ["dense"]


def test_limited_records_refused_unless_allowed(store_dir: Path) -> None:
    frame = load_store(store_dir)
    with pytest.raises(LimitedRecordsError, match=r"--limit.*svd-llm-0\.6-0\.json"):
        render_leaderboard(frame, "md")
    text = render_leaderboard(frame, "md", allow_limited=True)
    assert "60%" in text and "†" in text and "--limit" in text


def test_one_table_per_model_and_model_selection(frame: pd.DataFrame) -> None:
    other = records_to_frame(
        [make_record("dense", 0.0, model__name="other-llm"), make_record("svd", 0.2, model__name="other-llm")]
    )
    both = pd.concat([frame, other], ignore_index=True)
    text = render_leaderboard(both, "md")
    assert text.count("| Ratio") == 2 and "**other-llm**" in text and "**toy-llama**" in text
    only = render_leaderboard(both, "md", model="other-llm")
    assert "toy-llama" not in only and len(md_rows(only)) == 2
    with pytest.raises(ValueError, match="Did you mean 'toy-llama'"):
        render_leaderboard(both, "md", model="toy-lama")
    csv = pd.read_csv(pd.io.common.StringIO(render_leaderboard(both, "csv")))
    assert set(csv["model"]) == {"toy-llama", "other-llm"}


def test_metric_selection_and_unknown_metric(frame: pd.DataFrame) -> None:
    text = render_leaderboard(frame, "md", metrics=["wikitext2", "piqa", "average"])
    assert md_header(text) == ["Ratio", "Method", "n", "WikiText-2↓", "PIQA (acc_norm)↑", "Average↑"]
    with pytest.raises(UnknownMetricError, match="Did you mean"):
        render_leaderboard(frame, "md", metrics=["hellaswg"])


def test_mixed_protocols_in_one_column_are_refused() -> None:
    recs = [
        make_record("svd", 0.2),
        make_record("svd-llm", 0.2, metrics__wikitext2__protocol="wikitext2@4096"),
    ]
    with pytest.raises(ValueError, match="mixes wikitext2.protocol"):
        render_leaderboard(records_to_frame(recs), "md")


def test_same_method_with_two_calibrations_is_labelled_apart() -> None:
    recs = [make_record("svd-llm", 0.2), make_record("svd-llm", 0.2, calibration__samples=256, run_key="b")]
    rows = md_rows(render_leaderboard(records_to_frame(recs), "md"))
    assert len(rows) == 2 and all("calib" in r[1] for r in rows)


def test_empty_store_and_bad_format() -> None:
    with pytest.raises(ValueError, match="no usable records"):
        render_leaderboard(records_to_frame([]), "md")
    with pytest.raises(ValueError, match="unknown leaderboard format"):
        render_leaderboard(records_to_frame(fixture_records()[:1]), "xml")
    with pytest.raises(ValueError, match="is a site"):
        render_leaderboard(records_to_frame(fixture_records()[:1]), "html")


def test_embedding_fidelity_store() -> None:
    """The offline MiniLM reference only has embed-fidelity metrics; the table must still work."""
    recs = []
    for method, ratio, cos in (("dense", 0.0, 1.0), ("svd", 0.2, 0.91), ("svd-llm", 0.2, 0.97)):
        rec = make_record(method, ratio)
        rec["metrics"] = {"embed-fidelity": {"mean_cos": cos, "p05_cos": cos - 0.1, "mean_err_norm": 1 - cos,
                                             "protocol": "embed-fidelity@wikitext2-test-512x128"}}  # fmt: skip
        recs.append(rec)
    text = render_leaderboard(records_to_frame(recs), "md")
    assert md_header(text) == ["Ratio", "Method", "n", "Emb. cos↑", "Emb. cos p5↑", "Emb. err↓"]
    assert md_rows(text)[2][3:] == ["**0.970**", "**0.870**", "**0.030**"]
