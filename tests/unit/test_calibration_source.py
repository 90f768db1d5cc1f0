"""The calibration source in records and run keys does not depend on where the data pack lives."""

from __future__ import annotations

import torch

from harness.data import Calibration, portable_source


def test_pack_paths_are_written_relative_to_the_pack_on_any_mount(tmp_path, monkeypatch):
    pack = tmp_path / "somewhere" / "data"
    (pack / "wikitext-2-v1").mkdir(parents=True)
    (pack / "wikitext-2-v1" / "valid.txt").write_text("text")
    link = tmp_path / "elsewhere"
    link.symlink_to(tmp_path / "somewhere")
    monkeypatch.setenv("SVDBENCH_DATA", str(pack))
    expected = "file:${SVDBENCH_DATA}/wikitext-2-v1/valid.txt"
    assert portable_source(f"file:{pack}/wikitext-2-v1/valid.txt") == expected
    assert portable_source(f"file:{link}/data/wikitext-2-v1/valid.txt") == expected  # the same file by another path
    monkeypatch.setenv("SVDBENCH_DATA", str(link / "data"))
    assert portable_source(f"file:{pack}/wikitext-2-v1/valid.txt") == expected
    # Outside the pack, or not a file: kept as given.
    assert portable_source(f"file:{tmp_path}/mine.txt") == f"file:{tmp_path}/mine.txt"
    assert portable_source("wikitext2") == "wikitext2"
    monkeypatch.delenv("SVDBENCH_DATA")
    assert portable_source(f"file:{pack}/wikitext-2-v1/valid.txt") == f"file:{pack}/wikitext-2-v1/valid.txt"


def test_calibration_record_uses_the_portable_source(tmp_path, monkeypatch):
    monkeypatch.setenv("SVDBENCH_DATA", str(tmp_path))
    calib = Calibration(f"file:{tmp_path}/valid.txt", 2, 3, 0, torch.zeros(2, 3, dtype=torch.int64))
    assert calib.record()["source"] == "file:${SVDBENCH_DATA}/valid.txt"
    other = Calibration(f"file:{tmp_path}/valid.txt", 2, 3, 0, torch.ones(2, 3, dtype=torch.int64))
    assert other.record()["token_hash"] != calib.record()["token_hash"]  # the tokens stay named by their hash
