"""Singular-value spectra of every target linear, plain (of W) and whitened (of W T, H = T T^T).

The whitened spectrum is what svd-llm truncates: each dropped value costs exactly its square in
squared calibration output error, while the plain spectrum says nothing about the outputs. The dump
feeds ``svdbench plot --kind spectra``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.engine.models import get_module
from harness.runs import Session
from methods._linalg import rank_from_ratio
from methods.statistics import InputGram


def dump_spectra(session: Session, out: Path, ratio: float | None = None) -> Path:
    """Write ``[{"layer", "plain", "whitened", "rank"}]`` for every target linear to ``out`` (JSON).

    Args:
        session: A loaded model with its calibration settings.
        out: Output file.
        ratio: When given, each entry's ``rank`` is the rank kept at that ratio.
    """
    source = session.statistics()
    gram = [InputGram()]
    source.compute(source.missing(gram))
    entries = []
    for block in range(session.layout.n_blocks):  # one block's statistics in memory at a time
        stats = source.load(block, gram)[0]
        for mod in session.layout.in_block(block):
            weight = get_module(session.model, mod.name).weight.detach().to(source.device, torch.float64)
            white = stats[mod.name].whitening()
            entries.append({
                "layer": mod.name,
                "plain": torch.linalg.svdvals(weight).tolist(),
                "whitened": torch.linalg.svdvals(weight @ white.factor).tolist(),
                "rank": None if ratio is None else rank_from_ratio(mod.out_features, mod.in_features, ratio),
            })
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(entries), encoding="utf-8")
    return out
