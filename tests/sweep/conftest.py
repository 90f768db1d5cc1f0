"""Shared fixtures of the sweep tests: one tiny random Llama per session and a spec writer."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.utils import DATA, make_tiny_model_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-block Llama; beside it ``calib.txt``, a 40k-character slice of the pack's calibration
    text (tokenizing all of it takes a second or more with the tiny vocabulary, per planning)."""
    model = make_tiny_model_dir("llama", tmp_path_factory.mktemp("sweep-model") / "tiny-llama")
    text = (DATA / "wikitext-2-v1" / "valid.txt").read_text(encoding="utf-8")[:40_000]
    (model.parent / "calib.txt").write_text(text, encoding="utf-8")
    return model


def small_spec(model: Path, results: Path, **grid: object) -> dict:
    """A sweep over the tiny model sized to run in about a second per cell on one CPU core."""
    return {"sweep": {
        "name": "test",
        "results": str(results),
        "grid": {"models": [str(model)], "methods": ["svd", "svd-llm"], "ratios": [0.3, 0.6], **grid},
        "calibration": {"source": f"file:{model.parent / 'calib.txt'}", "samples": 8, "seqlen": 64},
        "eval": {"seqlen": 128, "max_windows": 4},
    }}


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[[dict], Path]:
    def write(raw: dict, name: str = "spec.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        return path

    return write


def subprocess_env(cache: Path, **extra: str) -> dict[str, str]:
    """Environment for a child ``python -m harness.cli``: this checkout first on the path, a private
    statistics cache, offline hub."""
    env = dict(os.environ)
    env.update(PYTHONPATH=str(ROOT), SVDBENCH_CACHE=str(cache), SVDBENCH_DATA=str(DATA),
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)
    return env


def records(results: Path) -> dict[str, Path]:
    """Run key -> path of every record (hidden temporaries excluded)."""
    return {p.stem: p for p in results.glob("*.json")}
