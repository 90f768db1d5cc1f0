"""Gradient statistics: one forward and one backward pass of the whole model per calibration window.

A statistic with ``scope = "gradient"`` (:mod:`methods.statistics`) is fed, per target linear, the
gradient ``G = dL/dW: (m, n)`` of that linear's weight, where ``L`` is the mean next-token negative
log-likelihood of one calibration window (float32 log-softmax of the logits, real tokens only). One
window per backward makes accumulated squares a per-sample empirical Fisher (the mean over samples
of ``(dL/dw)^2``), not the square of a batch mean.

Memory: every target weight carries a ``register_post_accumulate_grad_hook`` that, as soon as
autograd has produced that weight's gradient, feeds the accumulators and drops the gradient
(``param.grad = None``). So at most one weight gradient lives at a time, never all of them, and only
the target weights require gradients (every other parameter is frozen for the pass). What the pass
does need is the **whole model on the compute device** plus one window's activations saved for the
backward: unlike the block-streamed statistics, a backward pass through the LM head needs every
block at once. The model is moved there for the pass and back afterwards.

Cost: per calibration window one forward and one backward (about three forwards' worth of matrix
work). Half precision: gradients below float16's range underflow to zero (components floor their
weights); ``bfloat16`` or ``float32`` keep the full range. A non-finite gradient is an error.

Only causal LMs have a next-token loss: a method that declares a gradient statistic declares
``requires_causal_lm``, so a run on an encoder is refused before the model loads.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from harness.engine.capture import _forward_kwargs
from harness.engine.models import Layout, get_module
from methods.statistics import Accumulator, GramProduct, Statistic

log = logging.getLogger(__name__)


def next_token_nll(logits: Tensor, ids: Tensor, mask: Tensor | None) -> Tensor:
    """Mean NLL of ``ids[:, 1:]`` under ``logits[:, :-1]`` (float32), over real tokens only.

    Args:
        logits: ``(b, L, V)``.
        ids: ``(b, L)`` token ids.
        mask: ``(b, L)`` 1 for real tokens, or None.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (b, L - 1)
    if mask is None:
        return nll.mean()
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    return nll[keep].mean()


def gradient_pass(model: nn.Module, layout: Layout, input_ids: Tensor, attention_mask: Tensor | None,
                  device: torch.device, statistics: list[Statistic]) -> list[dict[str, dict[str, Tensor]]]:
    """Accumulate the gradient-scope ``statistics`` of every target linear (module docstring).

    Args:
        model: The dense causal LM (restored: parameters, ``requires_grad`` flags and device).
        layout: Its layout.
        input_ids: ``(N, L)`` calibration windows; one forward + backward each.
        attention_mask: ``(N, L)`` or None.
        device: Where the whole model runs.
        statistics: Statistics with ``scope == "gradient"``.

    Returns:
        Per block: ``{module name: {result name: tensor}}`` (on ``device``).

    Raises:
        RuntimeError: when the model returns no logits (no next-token loss).
        FloatingPointError: on a non-finite loss or gradient.
    """
    accs: dict[str, list[Accumulator]] = {
        m.name: [s.accumulator(m.in_features, device, GramProduct()) for s in statistics] for m in layout.modules}
    state: dict[str, Any] = {"batch": 0}

    def hook(name: str) -> Callable[[Tensor], None]:
        def fire(param: Tensor) -> None:
            grad = param.grad
            if not torch.isfinite(grad).all():
                raise FloatingPointError(f"non-finite gradient of {name} on calibration window {state['batch']}")
            for acc in accs[name]:
                acc.add(grad, None, state["batch"])
            param.grad = None  # free it now: the model never holds all gradients

        return fire

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    home = params[0].device
    handles = []
    try:
        for p in params:
            p.requires_grad_(False)
        for m in layout.modules:
            weight = get_module(model, m.name).weight
            weight.requires_grad_(True)
            handles.append(weight.register_post_accumulate_grad_hook(hook(m.name)))
        model.to(device)
        extra = _forward_kwargs(model)
        with torch.enable_grad():
            for j in tqdm(range(input_ids.shape[0]), desc="gradients", unit="window", leave=False):
                state["batch"] = j
                ids = input_ids[j: j + 1].to(device)
                mask = None if attention_mask is None else attention_mask[j: j + 1].to(device)
                kwargs = dict(extra) if mask is None else {**extra, "attention_mask": mask}
                logits = getattr(model(input_ids=ids, **kwargs), "logits", None)
                if logits is None:
                    raise RuntimeError("gradient statistics need a causal LM's next-token logits")
                loss = next_token_nll(logits, ids, mask)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite next-token loss on calibration window {j}")
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p, flag in zip(params, flags, strict=True):
            p.grad = None
            p.requires_grad_(flag)
        model.to(home)
    out: list[dict[str, dict[str, Tensor]]] = [{} for _ in range(layout.n_blocks)]
    for m in layout.modules:
        results: dict[str, Tensor] = {}
        for acc in accs[m.name]:
            results.update(acc.result())
        out[m.block][m.name] = results
    return out

