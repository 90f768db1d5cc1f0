"""adaCR sign check: does block importance 1 - cos(in, out) track how much compressing a block hurts?

    python -m benchmarks.adacr_sign_check MODEL_DIR [--ratio 0.6] [--out FILE.json]

For each decoder block b: compress only block b with svd-llm (whitened truncation) at ``ratio``,
leave every other block dense, and measure the language-model loss on held-out windows (default:
PTB validation text, which neither the testbed models' training text nor the calibration
contains; no test split is touched). Prints the block cosine, the adaCR
importance I_n = (1 - cos) / mean(1 - cos), the loss increase, and the Spearman rank correlation
between the importance and the loss increase (positive = the ``dissimilarity`` sign is right).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from harness.data import sample_calibration
from harness.engine.capture import capture_block_inputs
from harness.engine.compress import compress_model, restore
from harness.engine.models import discover, load_model
from harness.engine.statistics import CalibrationStatistics
from harness.testbeds.diagnostics import mean_token_nll
from methods import AllocationContext, Method
from methods.adacr import block_importance
from methods.block_similarity import BlockCosine
from methods.method import NoRefiner
from methods.statistics import InputGram
from methods.svd_llm import WhitenedFactorizer

log = logging.getLogger("benchmarks.adacr_sign_check")


@dataclass(frozen=True)
class OneBlock:
    """Keep ``1 - ratio`` in block ``block`` only; every other module stays dense."""

    name: ClassVar[str] = "one-block"
    block: int

    def allocate(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        return {m.name: (1.0 - ratio if m.block == self.block else 1.0) for m in ctx.modules}


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(v: list[float]) -> torch.Tensor:
        return torch.tensor(v).argsort().argsort().double()

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--ratio", type=float, default=0.6)
    p.add_argument("--calib", default=None, help="default: file:$SVDBENCH_DATA/wikitext-2-v1/valid.txt")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--heldout", default=None, help="default: file:$SVDBENCH_DATA/ptb/ptb.valid.txt")
    p.add_argument("--heldout-samples", type=int, default=32)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    pack = os.environ.get("SVDBENCH_DATA", "")
    calib_src = args.calib or f"file:{pack}/wikitext-2-v1/valid.txt"
    heldout_src = args.heldout or f"file:{pack}/ptb/ptb.valid.txt"
    model, tok = load_model(args.model, "float32")
    layout = discover(model)
    calib = sample_calibration(tok, calib_src, args.calib_samples, args.seqlen, 0)
    heldout = sample_calibration(tok, heldout_src, args.heldout_samples, args.seqlen, 12345).input_ids
    cpu = torch.device("cpu")
    source = CalibrationStatistics.in_directory(
        model, layout, lambda: capture_block_inputs(model, layout, calib.input_ids, cpu), cpu,
        Path(tempfile.mkdtemp(prefix="adacr-sign-check-")))
    cosine = [BlockCosine()]
    source.compute([InputGram(), *cosine])
    block_cosine = [v["block_cosine"] for v in source.block_values(cosine)]
    base = mean_token_nll(model, heldout, batch_size=8)
    imp = block_importance(block_cosine, "dissimilarity")
    rows = []
    for b in range(layout.n_blocks):
        method = Method(f"svd-llm@block{b}", OneBlock(b), WhitenedFactorizer(), NoRefiner())  # type: ignore[arg-type]
        res = compress_model(model, layout, method, args.ratio, source)
        try:
            delta = mean_token_nll(model, heldout, batch_size=8) - base
        finally:
            restore(model, res)
        rows.append({"block": b, "cosine": block_cosine[b], "importance_n": imp[b], "loss_increase": delta})
        log.info("block %d: cos %.4f  I_n %.3f  dloss %.4f", b, block_cosine[b], imp[b], delta)
    rho = spearman([r["importance_n"] for r in rows], [r["loss_increase"] for r in rows])
    result = {"model": args.model, "ratio": args.ratio, "heldout": heldout_src, "dense_loss": base, "blocks": rows,
              "spearman_importance_vs_loss_increase": rho}
    print("| block | cos(in, out) | I_n (1 - cos) | loss increase |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['block']} | {r['cosine']:.4f} | {r['importance_n']:.3f} | {r['loss_increase']:.4f} |")
    print(f"\nSpearman(I_n, loss increase) = {rho:.3f}; dense held-out loss {base:.4f}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")


if __name__ == "__main__":
    main()
