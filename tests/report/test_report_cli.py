from __future__ import annotations

import argparse
import copy
from pathlib import Path

import pytest
from report_fixtures import make_record, write_store

from harness.report.cli import add_report_subcommands


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="svdbench")
    add_report_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_leaderboard_command(
    clean_store_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _run(["leaderboard", str(clean_store_dir), "--metrics", "wikitext2", "average"]) == 0
    assert "| Ratio" in capsys.readouterr().out
    out = tmp_path / "tables" / "lb.tex"
    assert _run(["leaderboard", str(clean_store_dir), "--format", "latex", "--output", str(out)]) == 0
    assert "\\toprule" in out.read_text()


def test_leaderboard_refuses_limited(store_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["leaderboard", str(store_dir)]) == 2
    assert _run(["leaderboard", str(store_dir), "--allow-limited", "--format", "csv"]) == 0
    assert "svd-llm" in capsys.readouterr().out


def test_compare_command_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = [make_record("dense", 0.0), make_record("svd-llm", 0.2)]
    base = write_store(tmp_path / "base", recs)
    assert _run(["compare", str(base), "--baseline", str(base)]) == 0
    worse = copy.deepcopy(recs[1])
    worse["metrics"]["wikitext2"]["ppl"] *= 1.1
    cur = write_store(tmp_path / "cur", [recs[0], worse])
    table = tmp_path / "diff.csv"
    assert _run(["compare", str(cur), "--baseline", str(base), "--rtol", "0.02", "--output", str(table)]) == 1
    assert "worse" in capsys.readouterr().out and "worse" in table.read_text()
    assert _run(["compare", str(cur), "--baseline", str(base), "--rtol", "0.2"]) == 0


def test_plot_command(
    clean_store_dir: Path, spectra_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "figs"
    argv = ["plot", str(clean_store_dir), "--kind", "zeroshot-vs-ratio", "spectra", "--out", str(out)]
    one_layer = ["--layers", "model.layers.0.x.q_proj"]
    assert _run([*argv, "--spectra", str(spectra_file), *one_layer, "--git-sha", "abc"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 4 and all(Path(p).exists() for p in printed)
    # The zero-shot figure beside the perplexity one, with a chance level (not drawn on perplexities).
    argv = ["plot", str(clean_store_dir), "--kind", "ppl-vs-ratio", "zeroshot-vs-ratio", "--chance", "0.3", "--out", str(out)]
    assert _run(argv) == 0
    assert [Path(p).name for p in capsys.readouterr().out.split()] == [
        "ppl-vs-ratio_wikitext2_toy-llama.pdf", "ppl-vs-ratio_wikitext2_toy-llama.png",
        "zeroshot-vs-ratio_average_toy-llama.pdf", "zeroshot-vs-ratio_average_toy-llama.png",
    ]
    assert _run([*argv[:-2], "--chance", "30", "--out", str(out)]) == 2
