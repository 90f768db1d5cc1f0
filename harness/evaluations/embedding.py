"""``embed-fidelity``: how close a compressed encoder's sentence embeddings stay to the dense ones.

Embeddings use the model's own pooling (sentence-transformers' ``1_Pooling`` config when the model
directory has one: all-MiniLM-L6-v2 takes the mean over non-padded tokens, then L2-normalises).
Default text set: WikiText-2 raw test paragraphs (non-heading rows longer than 80 characters), the
first 512, truncated to 128 tokens. Reported: mean and 5th-percentile cosine similarity to the
dense embeddings and the mean norm of the embedding error. Higher cosine is better.

Options (``--eval-option embed-fidelity.n_texts=128``): ``n_texts`` and ``max_tokens`` shorten the
protocol; both are in its id (``embed-fidelity@wikitext2-test-paragraphs-128x128``), so records of
different text sets never compare.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness import data
from harness.evaluations.registry import Evaluation, MetricSpec, register_evaluation


@dataclass(frozen=True)
class EmbedProtocol:
    """Parameters of the protocol (all recorded)."""

    texts: str = "wikitext2-test-paragraphs"
    n_texts: int = 512
    max_tokens: int = 128
    min_chars: int = 80
    batch_size: int = 32

    @property
    def protocol_id(self) -> str:
        return f"embed-fidelity@{self.texts}-{self.n_texts}x{self.max_tokens}"


def pooling_of(model: nn.Module) -> dict[str, bool]:
    """``{"mean": bool, "cls": bool, "normalize": bool}`` from the sentence-transformers config beside the weights."""
    root = Path(getattr(model.config, "_name_or_path", "") or ".")
    pooling = {"mean": True, "cls": False, "normalize": True}
    cfg = root / "1_Pooling" / "config.json"
    if cfg.is_file():
        raw = json.loads(cfg.read_text())
        pooling["mean"] = bool(raw.get("pooling_mode_mean_tokens", True))
        pooling["cls"] = bool(raw.get("pooling_mode_cls_token", False))
    modules = root / "modules.json"
    if modules.is_file():
        pooling["normalize"] = any("Normalize" in m.get("type", "") for m in json.loads(modules.read_text()))
    return pooling


@torch.no_grad()
def sentence_embeddings(
    model: nn.Module, tokenizer: Any, texts: list[str], proto: EmbedProtocol, device: torch.device
) -> torch.Tensor:
    """Pooled embeddings ``(len(texts), hidden)`` in float32 on the CPU."""
    pooling = pooling_of(model)
    out = []
    for start in range(0, len(texts), proto.batch_size):
        enc = tokenizer(texts[start : start + proto.batch_size], truncation=True, max_length=proto.max_tokens,
                        padding=True, return_tensors="pt").to(device)
        hidden = model(**enc).last_hidden_state.float()
        if pooling["cls"]:
            emb = hidden[:, 0]
        else:
            mask = enc.attention_mask.unsqueeze(-1).float()
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        if pooling["normalize"]:
            emb = torch.nn.functional.normalize(emb, dim=-1)
        out.append(emb.cpu())
    return torch.cat(out)


def protocol_texts(proto: EmbedProtocol) -> list[str]:
    return data.paragraphs(data.wikitext2_test_rows(), proto.min_chars)[: proto.n_texts]


def compare_embeddings(dense: torch.Tensor, compressed: torch.Tensor) -> dict[str, float]:
    """Mean and 5th-percentile cosine, mean error norm, over rows of ``(N, d)`` embeddings."""
    cos = torch.nn.functional.cosine_similarity(compressed.double(), dense.double(), dim=-1)
    err = (compressed.double() - dense.double()).norm(dim=-1)
    if not torch.isfinite(cos).all():
        raise FloatingPointError("non-finite sentence embeddings from the compressed model")
    return {
        "mean_cos": float(cos.mean()),
        "p05_cos": float(torch.quantile(cos, 0.05)),
        "mean_err_norm": float(err.mean()),
    }


def embed_reference(model: nn.Module, tokenizer: Any, cache: dict[str, Any], device: torch.device,
                    proto: EmbedProtocol | None = None) -> None:
    """Compute the dense embeddings once per run (called on the dense model before any cell)."""
    proto = proto or EmbedProtocol()
    if "embed_reference" not in cache:
        cache["embed_reference"] = sentence_embeddings(model, tokenizer, protocol_texts(proto), proto, device)


def embed_fidelity(model: nn.Module, tokenizer: Any, cache: dict[str, Any], device: torch.device,
                   proto: EmbedProtocol | None = None) -> dict[str, Any]:
    """The ``embed-fidelity`` metrics of ``model`` against the cached dense reference."""
    proto = proto or EmbedProtocol()
    if "embed_reference" not in cache:
        raise RuntimeError("embed-fidelity needs the dense reference embeddings; call embed_reference first")
    texts = protocol_texts(proto)
    emb = sentence_embeddings(model, tokenizer, texts, proto, device)
    return {"protocol": proto.protocol_id, "params": {**proto.__dict__, "pooling": pooling_of(model)},
            "n_texts": len(texts), **compare_embeddings(cache["embed_reference"], emb)}


# -- registration ---------------------------------------------------------------------------------
_DEFAULT = EmbedProtocol()
OPTIONS = {"n_texts": _DEFAULT.n_texts, "max_tokens": _DEFAULT.max_tokens}


def protocol_of(options: Mapping[str, Any]) -> EmbedProtocol:
    """The protocol a run's resolved ``embed-fidelity`` options name.

    Raises:
        ValueError: for a count that is not a positive integer.
    """
    values = {}
    for key in OPTIONS:
        raw = options.get(key, OPTIONS[key])
        try:
            value = int(raw)
        except (TypeError, ValueError):
            value = 0
        if value < 1 or (isinstance(raw, float) and raw != value):
            raise ValueError(f"embed-fidelity.{key} must be a positive integer, got {raw!r}")
        values[key] = value
    return EmbedProtocol(**values)


def _metrics() -> tuple[MetricSpec, ...]:
    return tuple(MetricSpec(f"embed-fidelity.{f}", label, hib, "score")
                 for f, label, hib in (("mean_cos", "Emb. cos", True), ("p05_cos", "Emb. cos p5", True),
                                       ("mean_err_norm", "Emb. err", False)))


register_evaluation(Evaluation(
    "embed-fidelity",
    lambda model, tokenizer, s: embed_fidelity(model, tokenizer, s.cache, s.device,
                                               protocol_of(s.options.get("embed-fidelity", {}))),
    metrics=_metrics(),
    aliases={"embed-fidelity": "embed-fidelity.mean_cos", "embed": "embed-fidelity.mean_cos",
             **{f: f"embed-fidelity.{f}" for f in ("mean_cos", "p05_cos", "mean_err_norm")}},
    needs_causal_lm=False,
    preflight=lambda: data.wikitext2_test_rows() and None,  # the texts are WikiText-2 test paragraphs
    reference=lambda model, tokenizer, s: embed_reference(model, tokenizer, s.cache, s.device,
                                                          protocol_of(s.options.get("embed-fidelity", {}))),
    options=OPTIONS,
    check_options=protocol_of,
))
