"""pytest fixtures for the report tests; the records themselves are built in report_fixtures.py."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from report_fixtures import fixture_records, write_store


@pytest.fixture
def records() -> list[dict[str, Any]]:
    return copy.deepcopy(fixture_records())


@pytest.fixture
def store_dir(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    return write_store(tmp_path / "results", records)


@pytest.fixture
def clean_store_dir(tmp_path: Path, records: list[dict[str, Any]]) -> Path:
    """The fixture store without the --limit record (what a real sweep directory looks like)."""
    return write_store(tmp_path / "clean", [r for r in records if r["limit"] is None])


@pytest.fixture
def spectra_file(tmp_path: Path) -> Path:
    """A spectra dump as the engine writes it: plain vs whitened singular values per layer."""
    entries = []
    for block, kind in ((0, "q_proj"), (0, "down_proj"), (7, "q_proj"), (7, "down_proj")):
        n = 64
        plain = [10.0 * (i + 1) ** -0.35 for i in range(n)]
        # Whitening makes the spectrum decay much faster: that is why it truncates better.
        whitened = [400.0 * math.exp(-0.12 * i) * (1 + 0.1 * block) for i in range(n)]
        entries.append(
            {"layer": f"model.layers.{block}.x.{kind}", "plain": plain, "whitened": whitened, "rank": 20}
        )
    path = tmp_path / "spectra.json"
    path.write_text(json.dumps(entries))
    return path
