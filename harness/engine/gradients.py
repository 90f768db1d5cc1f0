"""Gradient statistics: one forward and one backward pass of the whole model per calibration window.

A statistic with ``scope = "gradient"`` (:mod:`methods.statistics`) is fed, per target linear, the
gradient ``G = dL/dW: (m, n)`` of that linear's weight, where ``L`` is the mean next-token negative
log-likelihood of one calibration window (float32 log-softmax of the logits, real tokens only). One
window per backward makes accumulated squares a per-sample empirical Fisher (the mean over samples
of ``(dL/dw)^2``), not the square of a batch mean.

A statistic that declares ``feed = "output-grad"`` is fed instead, per target linear, the gradient
``delta = dL/dy: (1, L, m)`` of that linear's **output** (K-FAC's output-side factor), with the
window's attention mask, from a hook on the output tensor registered during the forward pass; its
accumulator is built with width ``m`` (``out_features``). When only such statistics are asked for,
no weight requires a gradient: the input embeddings' output does, so the backward computes the
activation gradients and none of the weight gradients.

Memory: every target weight carries a ``register_post_accumulate_grad_hook`` that, as soon as
autograd has produced that weight's gradient, feeds the accumulators and drops the gradient
(``param.grad = None``). So at most one weight gradient lives at a time, never all of them, and only
the target weights require gradients (every other parameter is frozen for the pass). What the pass
does need is the **whole model on the compute device** plus one window's activations saved for the
backward: unlike the block-streamed statistics, a backward pass through the LM head needs every
block at once. The model is moved there for the pass and back afterwards. An output-gradient feed
adds nothing of its own: the hook reads the tensor autograd already holds and drops its reference at
once; what its accumulators keep on the device (e.g. an ``(m, m)`` float64 Gram per target linear,
larger than the weight itself for a wide MLP) is the statistic's cost, documented with it.

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

FEEDS = ("weight-grad", "output-grad")  # what a gradient-scope statistic's ``feed`` may name


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
        statistics: Statistics with ``scope == "gradient"``; each fed its ``feed`` (default
            ``"weight-grad"``: ``dL/dW (m, n)``; ``"output-grad"``: ``dL/dy (1, L, m)`` with the mask).

    Returns:
        Per block: ``{module name: {result name: tensor}}`` (on ``device``).

    Raises:
        RuntimeError: when the model returns no logits (no next-token loss).
        FloatingPointError: on a non-finite loss or gradient.
    """
    feeds = [getattr(s, "feed", "weight-grad") for s in statistics]
    unknown = sorted(set(feeds) - set(FEEDS))
    if unknown:
        raise ValueError(f"unknown gradient feed {unknown}; known: {', '.join(FEEDS)}")
    accs: dict[str, list[Accumulator]] = {
        m.name: [s.accumulator(m.in_features, device, GramProduct()) for s, f in zip(statistics, feeds, strict=True)
                 if f == "weight-grad"] for m in layout.modules}
    out_accs: dict[str, list[Accumulator]] = {
        m.name: [s.accumulator(m.out_features, device, GramProduct()) for s, f in zip(statistics, feeds, strict=True)
                 if f == "output-grad"] for m in layout.modules}
    weight_feed = any(f == "weight-grad" for f in feeds)
    state: dict[str, Any] = {"batch": 0, "mask": None}

    def hook(name: str) -> Callable[[Tensor], None]:
        def fire(param: Tensor) -> None:
            grad = param.grad
            if not torch.isfinite(grad).all():
                raise FloatingPointError(f"non-finite gradient of {name} on calibration window {state['batch']}")
            for acc in accs[name]:
                acc.add(grad, None, state["batch"])
            param.grad = None  # free it now: the model never holds all gradients

        return fire

    def output_hook(name: str) -> Callable[..., None]:
        def feed(grad: Tensor) -> None:
            if not torch.isfinite(grad).all():
                raise FloatingPointError(f"non-finite output gradient of {name} on calibration window {state['batch']}")
            for acc in out_accs[name]:
                acc.add(grad.detach(), state["mask"], state["batch"])

        def forward(_module: nn.Module, _args: Any, output: Tensor) -> None:
            if output.requires_grad:  # one tensor hook per forward: fires once, with dL/dy of this window
                output.register_hook(feed)

        return forward

    def track_inputs(_module: nn.Module, _args: Any, output: Tensor) -> Tensor:
        return output.requires_grad_(True)  # only output gradients: the graph starts at the embeddings

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    home = params[0].device
    handles = []
    try:
        for p in params:
            p.requires_grad_(False)
        for m in layout.modules:
            module = get_module(model, m.name)
            if weight_feed:
                module.weight.requires_grad_(True)
                handles.append(module.weight.register_post_accumulate_grad_hook(hook(m.name)))
            if out_accs[m.name]:
                handles.append(module.register_forward_hook(output_hook(m.name)))
        if not weight_feed:
            handles.append(model.get_input_embeddings().register_forward_hook(track_inputs))
        model.to(device)
        extra = _forward_kwargs(model)
        with torch.enable_grad():
            for j in tqdm(range(input_ids.shape[0]), desc="gradients", unit="window", leave=False):
                state["batch"] = j
                ids = input_ids[j: j + 1].to(device)
                mask = None if attention_mask is None else attention_mask[j: j + 1].to(device)
                state["mask"] = None if mask is None else mask.bool()
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
        for acc in accs[m.name] + out_accs[m.name]:
            results.update(acc.result())
        out[m.block][m.name] = results
    return out

