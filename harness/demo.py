"""``svdbench demo``: the offline end-to-end job on the tiny reference model.

Trains (or reuses) the tiny reference model from the data pack, compresses it with svd and
svd-llm at ratios 0.4 and 0.6, evaluates WikiText-2 perplexity under the standard protocol at the
model's 256-token context, writes one JSON record per cell and prints the leaderboard.
"""

from __future__ import annotations

import logging
from pathlib import Path

from harness import data
from harness.reference_models import ensure_reference_model
from harness.report.leaderboard import render_leaderboard
from harness.report.store import load_store
from harness.runner import RunConfig, run

log = logging.getLogger(__name__)

DEMO_METHODS = ("svd", "svd-llm")
DEMO_RATIOS = (0.4, 0.6)


def demo(results: str | Path = "results/demo", model_name: str = "tiny-llama") -> int:
    """Run the demo; returns the process exit code."""
    pack = data.data_dir()
    calib = pack / "wikitext-2-v1" / "valid.txt"  # type: ignore[operator]
    model_dir = ensure_reference_model(model_name, data_dir=pack)
    cfg = RunConfig(
        model=str(model_dir), methods=DEMO_METHODS, ratios=DEMO_RATIOS, evals=("wikitext2",),
        calib=f"file:{calib}", calib_samples=64, calib_seqlen=256, seed=0, results=str(results),
    )
    run(cfg)
    print(render_leaderboard(load_store(Path(results)), "md"))
    log.info("records in %s", results)
    return 0
