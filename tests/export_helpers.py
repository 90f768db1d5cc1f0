"""Test helpers for exports: compress tiny random-init models cheaply, and run Python where svdbench
cannot be imported (the editable install makes it importable from anywhere, so an import blocker is
installed before anything else)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from tests.utils import CALIB, make_tiny_model_dir

# Prepended to every script run by :func:`run_without_svdbench`: importing harness or methods fails.
NO_SVDBENCH = """
import importlib.abc, sys
class _NoSvdbench(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("harness", "methods"):
            raise ImportError(f"svdbench is not importable here ({name})")
        return None
sys.meta_path.insert(0, _NoSvdbench())
sys.path[:] = [p for p in sys.path if p not in ("", ".")]
"""


def run_without_svdbench(script: str, *args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``script`` in a fresh interpreter that cannot import svdbench, with this process's thread
    count (same kernels, same sums), stdin closed (transformers' remote-code question answers itself
    with an error) and its own transformers modules cache under ``cwd``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS=str(torch.get_num_threads()), HF_MODULES_CACHE=str(cwd / "hf_modules"))
    return subprocess.run([sys.executable, "-c", NO_SVDBENCH + script, *args], cwd=cwd, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout)


def export_compressed(family: str, methods: Iterable[str], ratio: float, out: Path,
                      run_keys: bool = True) -> dict[str, dict[str, Any]]:
    """Compress a tiny random-init ``family`` model with each method and export it under ``out``.

    Returns:
        ``{method string: {"path", "method" (name), "base" (model dir)}}``; directories are named
        ``<family>-<method name without options>``.
    """
    from harness.engine.compress import compress_model, restore
    from harness.export import compression_summary, export_model
    from harness.runs import RunConfig, Session, prepare

    base = make_tiny_model_dir(family, out / f"base-{family}")
    methods = tuple(methods)
    cfg = RunConfig(model=str(base), methods=methods, ratios=(ratio,), evals=(), calib=CALIB, calib_samples=4,
                    calib_seqlen=32, device="cpu", dtype="float32", results=str(out / "unused-results"))
    prep = prepare(cfg)
    session = Session(prep)
    source = session.statistics()
    exported: dict[str, dict[str, Any]] = {}
    for text, method in zip(methods, prep.methods, strict=True):
        result = compress_model(session.model, session.layout, method, ratio, source, probes=session.probes(method))
        try:
            path = export_model(session.model, session.tokenizer, out / f"{family}-{method.name.partition('[')[0]}",
                                method={"name": method.name, "config": method.config()}, ratio=ratio,
                                run_key=session.cell_key(method, ratio) if run_keys else None,
                                base_model=session.model_info, compression=compression_summary(result))
        finally:
            restore(session.model, result)
        exported[text] = {"path": path, "method": method.name, "base": base}
    return exported
