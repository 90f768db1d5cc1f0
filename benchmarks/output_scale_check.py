"""Do refitted factors shrink their layers' outputs? Output-norm ratios of compressed vs dense linears.

    python -m benchmarks.output_scale_check --model minilm-l6 --method svd-llm,svd-llm+adacomp \\
        --ratio 0.4 [--calib-samples 128 --calib-seqlen 128] [--heldout-samples 64] [--out FILE.json]

Why: a refit that regresses the dense outputs ``W X`` on perturbed inputs ``X_c = X + E`` (adaComp's
``compressed`` mode, ResSVD's stage 2) is a least-squares fit with noisy regressors, whose optimum
attenuates the output toward zero (errors-in-variables shrinkage). That lowers each layer's squared
error and can still hurt end to end, e.g. when both the query and key projections shrink, so the
attention logits ``q.k`` shrink twice and attention flattens.

For each method: compress in place, run held-out texts (drawn from the calibration source with
another seed) through the compressed model and the dense one, and report per projection kind the
ratio ``||y_compressed|| / ||y_dense||`` of the linears' outputs over real tokens (each model on its
own stream), plus the mean per-token cosine of the final hidden states. Encoders take padded
paragraphs with a mask, causal LMs token windows.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from harness import data
from harness.engine.capture import capture_block_inputs
from harness.engine.compress import compress_model, restore
from harness.engine.models import discover, get_module, is_encoder_config, load_model
from harness.engine.statistics import CalibrationStatistics
from methods import parse_method, split_method_list

log = logging.getLogger("benchmarks.output_scale_check")


@torch.no_grad()
def output_norms(model: nn.Module, names: list[str], ids: Tensor, mask: Tensor | None,
                 batch: int = 16) -> tuple[dict[str, float], Tensor]:
    """Sum over real tokens of ``||y||^2`` per target linear, and the final hidden states ``(N, L, d)``."""
    sums: dict[str, float] = defaultdict(float)
    current: dict[str, Tensor | None] = {"mask": None}

    def hook(name: str):
        def fn(_m: nn.Module, _inp: tuple, out: Tensor) -> None:
            y = out.reshape(-1, out.shape[-1]).float()
            m = current["mask"]
            if m is not None:
                y = y[m.reshape(-1)]
            sums[name] += float(y.pow(2).sum())
        return fn

    handles = [get_module(model, n).register_forward_hook(hook(n)) for n in names]
    finals = []
    try:
        for s in range(0, ids.shape[0], batch):
            m = None if mask is None else mask[s : s + batch].bool()
            current["mask"] = m
            kwargs = {"use_cache": False} if m is None else {"attention_mask": m.long()}
            out = model(input_ids=ids[s : s + batch], output_hidden_states=True, **kwargs)
            finals.append(out.hidden_states[-1].float())
    finally:
        for h in handles:
            h.remove()
    return dict(sums), torch.cat(finals)


def measure_output_scales(args: argparse.Namespace) -> list[dict[str, Any]]:
    model, tok = load_model(args.model, "float32")
    layout = discover(model)
    encoder = is_encoder_config(model.config)
    device = torch.device("cpu")
    sampler = data.sample_paragraph_calibration if encoder else data.sample_calibration
    calib = sampler(tok, args.calib, args.calib_samples, args.calib_seqlen, 0)
    held = sampler(tok, args.calib, args.heldout_samples, args.calib_seqlen, 4321)
    mask = held.attention_mask

    def batches():
        return capture_block_inputs(model, layout, calib.input_ids, device, attention_mask=calib.attention_mask)

    source = CalibrationStatistics.in_directory(model, layout, batches, device,
                                                Path(tempfile.mkdtemp(prefix="output-scale-check-")))
    names = [m.name for m in layout.modules]
    kind = {m.name: m.kind for m in layout.modules}
    ref, ref_final = output_norms(model, names, held.input_ids, mask)
    rows = []
    for spec in args.method:
        method = parse_method(spec)
        for ratio in args.ratio:
            result = compress_model(model, layout, method, ratio, source)
            try:
                norms, final = output_norms(model, names, held.input_ids, mask)
            finally:
                restore(model, result)
            per_kind: dict[str, list[float]] = defaultdict(list)
            for n in names:
                per_kind[kind[n]].append((norms[n] / ref[n]) ** 0.5)
            cos = torch.nn.functional.cosine_similarity(final, ref_final, dim=-1)
            cos = cos[mask.bool()] if mask is not None else cos.flatten()
            row = {"method": method.name, "ratio": ratio,
                   "norm_ratio": {k: sum(v) / len(v) for k, v in per_kind.items()},
                   "final_hidden_cos": float(cos.mean())}
            rows.append(row)
            log.info("%s @ %.2f: %s", method.name, ratio, row)
    return rows


def render(rows: list[dict[str, Any]]) -> str:
    kinds = list(rows[0]["norm_ratio"]) if rows else []
    cols = ["ratio", "method", *[f"{k} ‖y'‖/‖y‖" for k in kinds], "final hidden cos"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        vals = " | ".join(f"{r['norm_ratio'][k]:.3f}" for k in kinds)
        lines.append(f"| {r['ratio']:.2f} | {r['method']} | {vals} | {r['final_hidden_cos']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--method", required=True, type=split_method_list)
    p.add_argument("--ratio", required=True, type=lambda s: [float(x) for x in s.split(",")])
    p.add_argument("--calib", default=None, help="default: file:$SVDBENCH_DATA/wikitext-2-v1/valid.txt")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-seqlen", type=int, default=128)
    p.add_argument("--heldout-samples", type=int, default=64)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    args.calib = args.calib or f"file:{os.environ.get('SVDBENCH_DATA', '')}/wikitext-2-v1/valid.txt"
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rows = measure_output_scales(args)
    text = render(rows)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
