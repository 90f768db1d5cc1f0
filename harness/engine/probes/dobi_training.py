"""Probe ``dobi_training``: Dobi-SVD's differentiable truncation positions, trained on the whole model.

``probe(allocator, target_keep) -> {"gammas": {module: gamma}, "seq_len": L, ...}`` for the allocator
``dobi-gamma`` (``methods/dobi_svd.py``; math in ``methods/dobi.py``; official ``svd_trainer.py``):

* every target linear becomes ``x -> soft_truncate(x W^T + b, gamma_j)`` (activations in float32, at
  least; one SVD per window), every weight frozen, one trainable scalar ``gamma_j`` per linear,
  initialised at the uniform allocation of ``target_keep``;
* per step, one calibration window (batch 1, windows reshuffled each epoch):
  ``loss = exp(NLL) + lambda |keep(gamma) - target_keep| + sum_j relu(-gamma_j)^2 + relu(gamma_j - gamma_max_j)^2``;
  Adam on the gammas, cosine annealing (``T_max`` = steps per epoch, from ``lr`` down to ``min_lr``);
* every ``save_every`` steps the gammas that produced that step's loss are a checkpoint; the one of
  least loss is returned (``select=best``, the official ``best_gamma.json``), else the last gammas.

The gamma unit is the calibration window length ``L`` (``methods.dobi.gamma_scale``). Causal LMs only.
Cost: ``epochs x n_sequences`` forward and backward passes of the whole model with one SVD per
target linear and window (and its backward), the model on the compute device; autograd holds every
block's activations of one window. Results are cached as checksummed JSON under
``$SVDBENCH_CACHE/dobi/`` keyed by the model content hash, dtype, the trained windows, the target
keep, the allocator's options and the target modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from harness.cache import cache_path, read_checked_json, write_checked_json
from harness.engine.gradients import next_token_nll
from harness.engine.models import Layout, get_module, set_module
from harness.engine.probes import ProbeContext, register_probe
from methods.components import component_config
from methods.dobi import gamma_init, gamma_max, gamma_scale, gamma_storage, soft_truncate

log = logging.getLogger(__name__)

PROBE_VERSION = 1  # bump when the training changes (invalidates cached gammas)


class SoftTruncatedLinear(nn.Module):
    """A frozen linear whose output is soft-truncated at the trainable position ``gamma``."""

    def __init__(self, linear: nn.Module, gamma: nn.Parameter, beta: float, window: int) -> None:
        super().__init__()
        self.linear, self.gamma, self.beta, self.window = linear, gamma, beta, window

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        dt = torch.promote_types(x.dtype, torch.float32)  # the official computeSVD_dtype
        w = self.linear.weight.to(dt)
        b = None if self.linear.bias is None else self.linear.bias.to(dt)
        a = nn.functional.linear(x.to(dt), w, b)
        flat = a.reshape(-1, a.shape[-2], a.shape[-1]) if a.dim() >= 3 else a
        out = soft_truncate(flat, self.gamma, self.beta, self.window)
        return out.reshape(a.shape).to(x.dtype)


class DobiTrainingProbe:
    """The ``dobi_training`` probe of one loaded model and calibration (module docstring).

    Args:
        model: The dense model (its modules and ``requires_grad`` flags are restored after a call).
        layout: Its layout.
        input_ids: ``(N, L)`` calibration windows; the first ``n_sequences`` are trained on.
        attention_mask: ``(N, L)`` or None; padded windows are refused (the SVD would see padding).
        device: Where the model trains.
        model_info: The session's model fingerprint.
        use_cache: Read and write the on-disk cache.
    """

    def __init__(self, model: nn.Module, layout: Layout, input_ids: Tensor, attention_mask: Tensor | None,
                 device: torch.device, model_info: dict[str, Any], use_cache: bool = True) -> None:
        self.model, self.layout, self.input_ids, self.attention_mask = model, layout, input_ids, attention_mask
        self.device, self.use_cache = device, use_cache
        self.model_key = model_info.get("content_hash") or f"{model_info.get('id')}@{model_info.get('revision')}"
        self.last_cost: dict[str, Any] = {}

    def __call__(self, allocator: Any, target_keep: float) -> dict[str, Any]:
        """Train the positions for ``target_keep`` with ``allocator``'s options (``dobi-gamma``)."""
        ids = self.input_ids[: allocator.n_sequences]
        if allocator.n_sequences > self.input_ids.shape[0]:
            log.warning("dobi_training: %d sequences requested, calibration has %d",
                        allocator.n_sequences, self.input_ids.shape[0])
        if self.attention_mask is not None and not bool(self.attention_mask[: ids.shape[0]].bool().all()):
            raise ValueError("dobi_training needs unpadded calibration windows (the activation SVD would see padding)")
        fields = {
            "version": PROBE_VERSION, "model": self.model_key, "dtype": str(next(self.model.parameters()).dtype),
            "calibration": hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest(),
            "shape": list(ids.shape), "target_keep": round(float(target_keep), 9),
            "allocator": component_config(allocator),
            "modules": [[m.name, m.out_features, m.in_features] for m in self.layout.modules],
        }
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
        path = cache_path("dobi", key, ".json")
        saved = read_checked_json(path) if self.use_cache else None
        if saved is not None and saved.get("fields") == fields:
            self.last_cost = {**saved["meta"], "cache": str(path), "hit": True}
            return saved["result"]
        t0 = time.perf_counter()
        result = self.train(allocator, target_keep, ids)
        meta = {"steps": len(result["history"]), "seconds": time.perf_counter() - t0,
                "tokens_per_step": int(ids.shape[1]), "keep": result["keep"], "loss": result["loss"]}
        self.last_cost = {**meta, "cache": str(path), "hit": False}
        if self.use_cache:
            write_checked_json(path, {"fields": fields, "result": result, "meta": meta})
        return result

    def train(self, allocator: Any, target_keep: float, ids: Tensor) -> dict[str, Any]:
        """The training loop (module docstring); returns gammas, the window length and the history."""
        seq_len = int(ids.shape[1])
        mods = self.layout.modules
        total = float(sum(m.params for m in mods))
        scales = {m.name: gamma_scale(m.out_features, m.in_features, seq_len) for m in mods}
        start = target_keep if allocator.init_keep is None else allocator.init_keep
        gammas = {m.name: nn.Parameter(torch.tensor(gamma_init(start, m.out_features, m.in_features,
                                                               scales[m.name], allocator.remap),
                                                    dtype=torch.float32, device=self.device)) for m in mods}
        home = next(self.model.parameters()).device
        flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        originals: dict[str, nn.Module] = {}
        history: list[dict[str, float]] = []
        best: tuple[float, dict[str, float]] | None = None
        was_training = self.model.training
        try:
            self.model.to(self.device)
            self.model.eval()  # no dropout (0 in Llama-family configs; the official Trainer is in train mode)
            for p in self.model.parameters():
                p.requires_grad_(False)
            for m in mods:
                dense = get_module(self.model, m.name)
                originals[m.name] = set_module(self.model, m.name,
                                               SoftTruncatedLinear(dense, gammas[m.name], allocator.beta, allocator.window))
            opt = torch.optim.Adam(list(gammas.values()), lr=allocator.lr)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=ids.shape[0], eta_min=allocator.min_lr)
            gen = torch.Generator().manual_seed(allocator.seed)
            steps = allocator.epochs * ids.shape[0]
            with tqdm(total=steps, desc=f"Dobi-SVD gamma training ({steps} steps)", unit="step", leave=False) as bar:
                for _ in range(allocator.epochs):
                    for i in torch.randperm(ids.shape[0], generator=gen).tolist():
                        batch = ids[i: i + 1].to(self.device)
                        logits = self.model(input_ids=batch, use_cache=False).logits
                        nll = next_token_nll(logits, batch, None)
                        size = sum(gamma_storage(gammas[m.name], m.out_features, m.in_features, scales[m.name],
                                                 allocator.remap) for m in mods)
                        keep = size / total
                        penalty = sum(torch.relu(-g) ** 2 + torch.relu(g - gamma_max(m.out_features, m.in_features, seq_len)) ** 2
                                      for m, g in ((m, gammas[m.name]) for m in mods))
                        loss = torch.exp(nll) + allocator.lambda_reg * (keep - target_keep).abs() + penalty
                        if not torch.isfinite(loss):
                            raise FloatingPointError(f"dobi_training: non-finite loss at step {len(history)}")
                        snapshot = {name: float(g.detach()) for name, g in gammas.items()}
                        history.append({"loss": float(loss.detach()), "nll": float(nll.detach()), "keep": float(keep.detach()),
                                        "lr": float(opt.param_groups[0]["lr"])})
                        if len(history) % allocator.save_every == 0 and (best is None or history[-1]["loss"] < best[0]):
                            best = (history[-1]["loss"], snapshot)
                        opt.zero_grad(set_to_none=True)
                        loss.backward()
                        bad = [n for n, g in gammas.items() if g.grad is not None and not torch.isfinite(g.grad)]
                        if bad:
                            raise FloatingPointError(f"dobi_training: non-finite gradient of gamma for {bad[:3]}")
                        opt.step()
                        sched.step()
                        bar.update(1)
        finally:
            for name, old in originals.items():
                set_module(self.model, name, old)
            for name, p in self.model.named_parameters():
                p.requires_grad_(flags.get(name, p.requires_grad))
            self.model.train(was_training)
            self.model.to(home)
        last = {name: float(g.detach()) for name, g in gammas.items()}
        chosen = best[1] if allocator.select == "best" and best is not None else last
        achieved = sum(float(gamma_storage(torch.tensor(chosen[m.name]), m.out_features, m.in_features,
                                           scales[m.name], allocator.remap)) for m in mods) / total
        log.info("dobi_training: %d steps, loss %.4g -> %.4g, keep %.4f (target %.4f)", len(history),
                 history[0]["loss"], history[-1]["loss"], achieved, target_keep)
        return {"gammas": chosen, "seq_len": seq_len, "keep": achieved,
                "loss": best[0] if chosen is not last and best is not None else history[-1]["loss"],
                "history": history}


@register_probe("dobi_training")
def build(ctx: ProbeContext) -> DobiTrainingProbe:
    """The probe for one session (building it runs nothing)."""
    return DobiTrainingProbe(ctx.model, ctx.layout, ctx.input_ids, ctx.attention_mask, ctx.device, ctx.model_info)
