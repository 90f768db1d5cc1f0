"""Test-suite defaults: offline hub, the data pack beside the checkout, a repo-local cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("SVDBENCH_DATA", str(ROOT.parent / "shared" / "data"))
os.environ.setdefault("SVDBENCH_CACHE", str(ROOT / ".cache" / "svdbench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (README: ``-n 2``) the workers share the cores: one thread each, so two workers
# on 2 cores do not oversubscribe them (subprocesses the tests start inherit the same setting).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(_threads)
    torch.set_num_threads(_threads)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dirs() -> dict[str, Path]:
    """Directories of the tiny testbed models, keyed by family (``"llama"``, ``"opt"``).

    Trained from the data pack on first use (a few minutes each on two CPU cores) and cached under
    ``$SVDBENCH_CACHE/testbeds``.
    """
    from harness.testbeds.trained import ensure_testbed_models

    # Both train at once, one single-threaded process each (under xdist the other workers wait on
    # the cache locks or run tests that need no trained model meanwhile).
    dirs = ensure_testbed_models(["tiny-llama", "tiny-opt"])
    return {"llama": dirs["tiny-llama"], "opt": dirs["tiny-opt"]}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init 2-block Llama (GQA) with its tokenizer, for fast engine-level tests."""
    from tests.utils import make_tiny_model_dir

    return make_tiny_model_dir("llama", tmp_path_factory.mktemp("tiny-llama"))
