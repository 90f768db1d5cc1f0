"""Perplexity under the standard (GPTQ / SVD-LLM) protocol, as named protocols.

``wikitext2@L``: the ``wikitext-2-raw-v1`` test rows joined by ``"\\n\\n"``, one tokenizer pass
(the tokenizer adds its BOS once, at the very start), non-overlapping windows of ``L`` tokens
(remainder dropped), negative log-likelihood of positions 1..L-1 of each window given the tokens
before it, PPL = exp(mean token NLL). Logits are taken in float32. Windows whose loss is not finite
are counted and reported; the perplexity is then ``None`` (never silently skipped), and
``ppl_finite_windows`` gives the value over the finite windows for diagnosis.

``ptb@test-L``: the Penn Treebank test sentences (``ptb_text_only`` test, lines stripped) joined by
``"\\n\\n"`` as SVD-LLM does, same windowing. (GPTQ's older ``ptb`` evaluates the validation split.)

``c4@svdllm-L``: SVD-LLM's C4 variant, the first 2000 documents of the C4 (en) validation shard
joined by ``"\\n\\n"``, same windowing. GPTQ's ``c4`` (256 random windows) is a different number;
the protocol id says which one a record holds.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from harness import data
from harness.evaluations.registry import EvalSettings, Evaluation, MetricSpec, register_evaluation

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityProtocol:
    """A named perplexity protocol: where its text comes from and how rows are joined."""

    name: str
    rows: Callable[[], list[str]]
    joiner: str
    variant: str = ""

    def protocol_id(self, seqlen: int, max_windows: int | None, stride: int | None = None) -> str:
        base = f"{self.name}@{self.variant + '-' if self.variant else ''}{seqlen}"
        if stride is not None and stride > 1:
            base += f":every{stride}"
        return base if max_windows is None else f"{base}:first{max_windows}"

    def text(self) -> str:
        return self.joiner.join(self.rows())


PROTOCOLS: dict[str, PerplexityProtocol] = {
    "wikitext2": PerplexityProtocol("wikitext2", data.wikitext2_test_rows, "\n\n"),
    "ptb": PerplexityProtocol("ptb", data.ptb_test_sentences, "\n\n", "test"),
    "c4": PerplexityProtocol("c4", data.c4_validation_docs, "\n\n", "svdllm"),
}


Forward = Callable[[Sequence[torch.Tensor]], Iterable[torch.Tensor]]


def resident_forward(model: nn.Module, device: torch.device) -> Forward:
    """Logits of each batch from a model that sits on ``device`` (the usual case)."""
    return lambda batches: (model(input_ids=b.to(device), use_cache=False).logits for b in batches)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    seqlen: int,
    device: torch.device,
    batch_size: int = 8,
    max_windows: int | None = None,
    forward: Forward | None = None,
    stride: int | None = None,
) -> dict[str, object]:
    """Token perplexity over non-overlapping windows of one token stream.

    Args:
        model: Causal LM returning ``.logits``; on ``device`` unless ``forward`` streams it.
        input_ids: ``(T,)`` the whole tokenized text.
        seqlen: Window length.
        device: Where the model runs.
        batch_size: Windows per forward.
        max_windows: Evaluate only the first windows (a smoke protocol; recorded in the protocol id).
        forward: Batches of windows -> their logits (default :func:`resident_forward`; the engine
            passes a block-streaming one for models larger than the device).
        stride: Score every ``stride``-th window only (windows 0, k, 2k, ...): a named subset of the
            whole text (protocol id ``...:every{k}``), for budgets that cannot afford every window.

    Returns:
        ``ppl`` (None if any window was non-finite), ``ppl_finite_windows``, ``nll_sum``, ``tokens``
        (scored tokens), ``windows``, ``nonfinite_windows``.
    """
    n_windows = input_ids.numel() // seqlen
    if n_windows == 0:
        raise ValueError(f"text has {input_ids.numel()} tokens, fewer than one window of {seqlen}")
    windows = input_ids[: n_windows * seqlen].view(n_windows, seqlen)
    if stride is not None and stride > 1:
        windows = windows[::stride]
    if max_windows is not None:
        windows = windows[:max_windows]
    n_windows = windows.shape[0]
    batches = [windows[start : start + batch_size] for start in range(0, n_windows, batch_size)]
    logits_of = (forward or resident_forward(model, device))(batches)
    nll_sum, bad = 0.0, 0  # nll_sum: over windows with a finite loss only
    for batch, full_logits in tqdm(zip(batches, logits_of, strict=True), total=len(batches), desc="perplexity",
                                   unit="batch", leave=False):
        batch = batch.to(full_logits.device)
        logits = full_logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none"
        ).view(batch.shape[0], -1).double().sum(dim=1)
        for value in nll.tolist():
            if math.isfinite(value):
                nll_sum += value
            else:
                bad += 1
    tokens = n_windows * (seqlen - 1)
    finite_tokens = (n_windows - bad) * (seqlen - 1)
    ppl_finite = math.exp(nll_sum / finite_tokens) if finite_tokens else None
    if bad:
        log.warning("%d of %d windows had a non-finite loss; perplexity reported as None", bad, n_windows)
    return {
        "ppl": None if bad else ppl_finite,
        "ppl_finite_windows": ppl_finite,
        "nll_sum": nll_sum,
        "tokens": tokens,
        "windows": n_windows,
        "nonfinite_windows": bad,
    }


def evaluate_protocol(
    name: str,
    model: nn.Module,
    tokenizer: object,
    seqlen: int,
    device: torch.device,
    batch_size: int = 8,
    max_windows: int | None = None,
    token_cache: dict[str, torch.Tensor] | None = None,
    forward: Forward | None = None,
    stride: int | None = None,
) -> dict[str, object]:
    """Evaluate one named perplexity protocol; the result carries its ``protocol`` id."""
    proto = PROTOCOLS[name]
    cache = token_cache if token_cache is not None else {}
    if name not in cache:
        cache[name] = tokenizer(proto.text(), return_tensors="pt").input_ids[0]  # type: ignore[operator]
    result = perplexity(model, cache[name], seqlen, device, batch_size, max_windows, forward, stride)
    return {"protocol": proto.protocol_id(seqlen, max_windows, stride), **result}


# -- registration ---------------------------------------------------------------------------------
_LABELS = {"wikitext2": "WikiText-2", "ptb": "PTB", "c4": "C4"}


def _nonfinite_spec(name: str) -> Callable[[str], MetricSpec | None]:
    # A growing count of non-finite windows is a numerics regression, so lower is better; shown
    # only when asked for.
    key = f"{name}.nonfinite_windows"
    return lambda k: MetricSpec(key, f"{name} non-finite", False, "count", in_tables=False) if k == key else None


def _registered(proto: PerplexityProtocol) -> Evaluation:
    def run(model: nn.Module, tokenizer: Any, s: EvalSettings) -> dict[str, Any]:
        tokens = s.cache.setdefault("tokens", {})
        return evaluate_protocol(proto.name, model, tokenizer, s.seqlen, s.device, s.batch_size, s.max_windows, tokens,
                                 s.forward, s.window_stride)

    key = f"{proto.name}.ppl"
    aliases = {proto.name: key, **({"wikitext": key, "wt2": key} if proto.name == "wikitext2" else {})}
    return Evaluation(
        proto.name, run, metrics=(MetricSpec(key, _LABELS.get(proto.name, proto.name), False, "ppl"),), aliases=aliases,
        preflight=lambda: proto.rows() and None, streamable=True, pattern=_nonfinite_spec(proto.name),
    )


for _proto in PROTOCOLS.values():
    register_evaluation(_registered(_proto))
