"""README.md's generated tables are the output of their commands on the shipped records."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.readme_tables import END, find_blocks, regenerate

REPO = Path(__file__).resolve().parents[2]


def test_readme_blocks_equal_their_commands_on_the_shipped_records(monkeypatch):
    monkeypatch.chdir(REPO)  # the blocks' paths are relative to the repository root
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = find_blocks(text)
    assert any("leaderboard results/reference" in b.command for b in blocks)
    _, stale = regenerate(text)
    assert not stale, f"README.md is stale; run: python -m benchmarks.readme_tables README.md ({stale})"


def test_blocks_are_rewritten_and_broken_markers_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    command = "leaderboard results/reference --model smollm2-135m --format csv"
    text = f"intro\n<!-- svdbench: {command} -->\nold numbers\n{END}\nafter\n"
    new, changed = regenerate(text)
    assert changed == [command]
    assert new.startswith("intro\n") and new.endswith(f"{END}\nafter\n") and "old numbers" not in new
    assert "SVD-LLM" in new or "svd-llm" in new
    assert regenerate(new)[1] == []  # a regenerated file is up to date
    with pytest.raises(ValueError, match="has no"):
        find_blocks(f"<!-- svdbench: {command} -->\nno end\n")
    with pytest.raises(ValueError, match="must be one of"):
        find_blocks(f"<!-- svdbench: sweep spec.yaml -->\n{END}\n")
