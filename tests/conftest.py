"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dirs() -> dict[str, Path]:
    """Directories of the tiny reference models, keyed by family (``"llama"``, ``"opt"``).

    Trained from the data pack (``$SVDBENCH_DATA``) on first use, about two minutes each on two CPU
    cores, and cached under ``$SVDBENCH_CACHE/reference_models`` (default ``~/.cache/svdbench``).
    Skips when ``SVDBENCH_DATA`` is unset.
    """
    from harness.reference_models import ensure_reference_model

    if not os.environ.get("SVDBENCH_DATA"):
        pytest.skip("SVDBENCH_DATA is not set; the tiny reference models are trained from the data pack")
    return {family: ensure_reference_model(f"tiny-{family}") for family in ("llama", "opt")}
