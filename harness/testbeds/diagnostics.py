"""Diagnostics of the testbed models: validation loss and the LLM-likeness report.

Real LLMs have a few hidden-state channels 100-1000x larger than the median channel (massive
activations, attention sinks), and activation-aware SVD methods are designed around them.
:func:`activation_outlier_report` measures that per decoder block, so a model card can say how
LLM-like a small self-trained model is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase


@torch.no_grad()
def activation_outlier_report(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]
) -> list[dict]:
    """Per-block ratio of the largest per-channel peak |activation| to the median channel peak.

    Real LLMs have a few hidden-state channels 100-1000x the median; a ratio near 1-2 means no
    outlier channels. Each text is tokenized (with BOS) and truncated to the model's positions.

    Args:
        model: A Llama- or OPT-style causal LM.
        tokenizer: Its tokenizer.
        texts: Texts to run, e.g. held-out validation text.

    Returns:
        One dict per decoder block: ``block``, ``max_over_median``, ``top_channel``, ``max_peak``
        and ``median_peak``, measured on the block's output hidden states over all tokens.
    """
    blocks = model.get_decoder().layers
    peaks: list[torch.Tensor | None] = [None] * len(blocks)

    def hook(index: int):
        def record(_module: torch.nn.Module, _inputs: tuple, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            peak = hidden.detach().abs().float().reshape(-1, hidden.shape[-1]).amax(dim=0)
            peaks[index] = peak if peaks[index] is None else torch.maximum(peaks[index], peak)

        return record

    handles = [block.register_forward_hook(hook(i)) for i, block in enumerate(blocks)]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for text in texts:
            # Slice rather than truncation=True: that call leaves truncation set on the backend
            # tokenizer, and save_pretrained would write it into tokenizer.json.
            ids = tokenizer(text, return_tensors="pt", verbose=False).input_ids
            model(input_ids=ids[:, : model.config.max_position_embeddings].to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    report = []
    for index, peak in enumerate(peaks):
        if peak is None:
            raise ValueError("No text was run through the model; pass at least one non-empty text.")
        median = peak.median().item()
        report.append(
            {
                "block": index,
                "max_over_median": peak.max().item() / median,
                "top_channel": int(peak.argmax()),
                "max_peak": peak.max().item(),
                "median_peak": median,
            }
        )
    return report


@torch.no_grad()
def mean_token_nll(model: PreTrainedModel, windows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token negative log-likelihood (nats) over equal-length token windows.

    Args:
        model: A causal LM.
        windows: ``(n, length)`` token ids.
        batch_size: Windows per forward pass.

    Returns:
        The mean over every predicted token (each window predicts ``length - 1`` tokens).
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total = 0.0
    for start in range(0, windows.shape[0], batch_size):
        batch = windows[start : start + batch_size].to(device)
        total += model(input_ids=batch, labels=batch).loss.item() * batch.shape[0]
    model.train(was_training)
    return total / windows.shape[0]
