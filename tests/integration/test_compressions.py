"""Compress once, evaluate many: a store of compressed cells (harness.runs.compressions).

A first run compresses each cell and stores it; a later run that asks for another evaluation of the
same cells installs the stored modules instead of recompressing (its records show no statistics pass
and no factorization), and its metrics equal those of a run that compresses in-process. Covers the
three replacement module types (low-rank, column-preserving, shared basis).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.cli import main
from harness.runs import RunConfig, run
from harness.runs.compressions import WEIGHTS, CompressionStore
from tests.utils import CALIB, make_tiny_model_dir

pytestmark = pytest.mark.integration

METHODS = ("svd-llm", "basis-sharing", "duo-svd[kl-knapsack.n_sequences=1,kl-knapsack.step=0.3]")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir("llama", tmp_path_factory.mktemp("model") / "tiny-llama")


def _cfg(model: Path, results: Path, store: Path | None, windows: int, methods=METHODS) -> RunConfig:
    return RunConfig(model=str(model), methods=methods, ratios=(0.4,), calib=CALIB, calib_samples=4, calib_seqlen=32,
                     eval_seqlen=32, eval_max_windows=windows, device="cpu", results=str(results),
                     compressed_store=None if store is None else str(store))


def _cells(paths: list[Path]) -> dict[str, dict]:
    records = [json.loads(p.read_text()) for p in paths]
    return {r["method"]["name"]: r for r in records if r["method"]["name"] != "dense"}


def test_a_stored_compression_is_evaluated_without_recompressing(tiny_llama: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store"
    first = _cells(run(_cfg(tiny_llama, tmp_path / "a", store, windows=1)))
    for rec in first.values():
        assert rec["compression"]["source"] == "computed" and rec["compression"]["stored"] is True
        assert rec["timings_s"]["compress"] > 0
    entries = CompressionStore(store).entries()
    assert sorted(e.key for e in entries) == sorted(r["compression"]["key"] for r in first.values())

    # Another evaluation (two windows: another protocol, another run key) of the same cells.
    later = _cells(run(_cfg(tiny_llama, tmp_path / "b", store, windows=2)))
    fresh = _cells(run(_cfg(tiny_llama, tmp_path / "c", None, windows=2)))
    for name, rec in later.items():
        assert rec["run_key"] != first[name]["run_key"]
        block = rec["compression"]
        assert block["source"] == "store" and block["key"] == first[name]["compression"]["key"]
        assert rec["timings_s"]["statistics"] == 0.0 and rec["timings_s"]["compress"] == 0.0
        assert "factorize" not in rec["timings_s"] and rec["timings_s"]["load_compression"] > 0
        assert block["original_timings_s"]["compress"] == first[name]["timings_s"]["compress"]
        # Equal to compressing in-process: metrics, counts and ranks.
        assert rec["metrics"] == fresh[name]["metrics"], name
        assert rec["achieved_ratio"] == fresh[name]["achieved_ratio"]
        assert [lay["rank"] for lay in rec["layers"]] == [lay["rank"] for lay in fresh[name]["layers"]]
        assert fresh[name]["compression"] == {"key": block["key"], "source": "computed", "stored": False}

    # A damaged entry is reported, moved aside and recomputed, never evaluated.
    key = first["svd-llm"]["compression"]["key"]
    weights = store / key / WEIGHTS
    weights.write_bytes(b"\0" * 8 + weights.read_bytes()[8:])
    again = _cells(run(_cfg(tiny_llama, tmp_path / "d", store, windows=2, methods=("svd-llm",))))
    assert again["svd-llm"]["compression"]["source"] == "computed"
    assert again["svd-llm"]["metrics"] == fresh["svd-llm"]["metrics"]
    assert list(store.glob(f"{key}.corrupt-*"))


def test_listing_pruning_and_bounds(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SVDBENCH_CACHE", str(tmp_path / "cache"))
    store = tmp_path / "store"
    run(_cfg(tiny_llama, tmp_path / "a", store, windows=1, methods=("svd", "svd-llm")))
    entries = CompressionStore(store).entries()
    assert len(entries) == 2 and {e.method for e in entries} == {"svd", "svd-llm"}
    assert main(["compressions", "list", "--store", str(store)]) == 0
    assert "2 entries" in capsys.readouterr().out
    assert main(["compressions", "prune", "--store", str(store)]) == 2  # prune what?
    # A bound keeps the most recently used entry.
    smallest = min(e.bytes for e in entries)
    removed = CompressionStore(store).prune(max_bytes=max(e.bytes for e in entries))
    assert len(removed) == 1 and removed[0].key == entries[-1].key and smallest > 0
    assert main(["compressions", "prune", "--store", str(store), "--key", entries[0].key]) == 0
    assert CompressionStore(store).entries() == []
    with pytest.raises(ValueError, match="no stored compression"):
        CompressionStore(store).prune(keys=["0" * 20])
