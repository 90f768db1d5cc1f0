"""Probe ``asvd_sensitivity``: per-module calibration perplexity tables for ASVD's allocator.

``probe(candidates, n_sequences, factorizer) -> {module_name: {keep: perplexity}}`` (ASVD,
arXiv 2312.05821, Sec. 3.3; allocator in ``methods/sensitivity_threshold.py``):

* ``P_j(p)``: exp of the mean next-token NLL on the first ``n_sequences`` calibration windows when
  target linear ``j`` alone is replaced by ``factorizer.factorize(W_j, stats_j, k(p))`` and every
  other module stays dense; a keep that saves no storage is the dense perplexity.
* The factorizer is the method's own (ASVD's scaled truncation for ``asvd``, the whitened one for
  ``svd-llm+asvd-sensitivity``); its statistics are read from the store one block at a time.
* A failed or non-finite factorization is an error (ASVD's code re-initialises such a layer).

Cost: ``n_sequences x (1 + sum_j #distinct ranks of j's candidates)`` sequence-forwards plus one
factorization per (module, distinct rank). It reuses the KL probe's forward machinery
(``harness/engine/probes/kl_sensitivity.py``): the dense model's block outputs are recorded once and a
forward for a module of block ``b`` replays block ``b - 1``'s output instead of recomputing blocks
``0..b-1``, which the perturbation cannot change. Tables are cached as checksummed JSON under
``$SVDBENCH_CACHE/sensitivity/`` keyed by the model content hash, dtype, the calibration (all
windows: they made the statistics) and the scored windows, candidates, the factorizer's full config
and the target modules. Causal LMs only (an encoder has no next-token loss; the allocator declares
``requires_causal_lm``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from harness.cache import cache_path, read_checked_json, write_checked_json
from harness.engine.models import Layout, get_module, set_module
from harness.engine.probes import ProbeContext, register_probe
from harness.engine.probes.kl_sensitivity import KLSensitivityProbe
from methods import LinearStats, rank_for
from methods.components import component_config

log = logging.getLogger(__name__)

PROBE_VERSION = 1  # bump when the definition of P changes (invalidates cached tables)


def _sha(t: Tensor) -> str:
    return hashlib.sha256(t.to(torch.int64).numpy().tobytes()).hexdigest()


class _NextTokenReplay(KLSensitivityProbe):
    """The KL probe's batched, block-replaying forwards, scoring the windows' own next tokens: the
    per-batch reference handed to ``_kl`` is the batch's token ids, the "divergence" is the NLL."""

    def _outputs(self, batch: Tensor, mask: Tensor | None) -> Tensor:
        out = super()._outputs(batch, mask)
        if self.measure != "kl":
            raise RuntimeError("asvd_sensitivity needs next-token logits (a causal LM)")
        return out

    def _divergence(self, ref: Tensor, new: Tensor, mask: Tensor | None) -> Tensor:
        nll = -new[:, :-1].gather(-1, ref[:, 1:, None]).squeeze(-1)  # (b, L - 1)
        return nll if mask is None else nll[(mask[:, 1:] * mask[:, :-1]).bool()]


class PerplexitySensitivityProbe:
    """The ``asvd_sensitivity`` probe of one loaded model and calibration (module docstring).

    Args:
        model: The dense model (restored after every call).
        layout: Its layout.
        load_block: ``f(block) -> {module name: LinearStats}`` from the statistics store.
        input_ids: ``(N, L)`` calibration windows; the first ``n_sequences`` are scored.
        device: Where the forwards and the factorizations run.
        model_info: The session's model fingerprint.
        batch_size: Sequences per forward.
        skip_prefix: Replay recorded dense block outputs instead of recomputing unperturbed blocks.
        use_cache: Read and write the on-disk table cache.
        attention_mask: ``(N, L)`` or None.
    """

    def __init__(self, model: nn.Module, layout: Layout, load_block: Callable[[int], dict[str, LinearStats]],
                 input_ids: Tensor, device: torch.device, model_info: dict[str, Any], batch_size: int = 8,
                 skip_prefix: bool = True, use_cache: bool = True, attention_mask: Tensor | None = None) -> None:
        self.replay = _NextTokenReplay(model, layout, load_block, input_ids, device, model_info, batch_size,
                                       skip_prefix, use_cache, attention_mask)
        self.model, self.layout, self.device = model, layout, device
        self.last_cost: dict[str, Any] = {}

    def key_fields(self, n: int, keeps: Sequence[float], factorizer: Any) -> dict[str, Any]:
        r = self.replay
        fields = {
            "probe": "asvd_sensitivity", "version": PROBE_VERSION, "model": r.model_key,
            "dtype": str(next(self.model.parameters()).dtype),
            "calibration": _sha(r.input_ids), "shape": list(r.input_ids.shape), "n_sequences": n,
            "candidates": sorted(float(k) for k in keeps), "factorizer": component_config(factorizer),
            "modules": [[m.name, m.out_features, m.in_features] for m in self.layout.modules],
        }
        if r.attention_mask is not None:
            fields["attention_mask"] = _sha(r.attention_mask)
        return fields

    def __call__(self, candidates: Sequence[float], n_sequences: int, factorizer: Any) -> dict[str, dict[float, float]]:
        """``{module_name: {keep: perplexity}}`` for every target linear and keep in ``candidates``.

        Args:
            candidates: Keep ratios in (0, 1).
            n_sequences: Calibration windows to score (at most the session's).
            factorizer: The method's factorizer (``factorize(W, stats, rank)``).
        """
        keeps = list(dict.fromkeys(float(k) for k in candidates))
        total = self.replay.input_ids.shape[0]
        if n_sequences > total:
            log.warning("asvd_sensitivity: %d sequences requested, calibration has %d", n_sequences, total)
        n = min(n_sequences, total)
        fields = self.key_fields(n, keeps, factorizer)
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
        path = cache_path("sensitivity", key, ".json")
        saved = read_checked_json(path) if self.replay.use_cache else None
        if saved is not None and saved.get("fields") == fields:
            self.last_cost = {**saved["meta"], "cache": str(path), "hit": True}
            log.info("asvd_sensitivity: cached table %s (%d forwards, %.0f s when computed)",
                     path, saved["meta"]["forwards"], saved["meta"]["seconds"])
            return {name: {float(k): v for k, v in rows} for name, rows in saved["table"].items()}
        t0 = time.perf_counter()
        table, forwards, dense_ppl = self._measure(n, keeps, factorizer)
        meta = {"forwards": forwards, "seconds": time.perf_counter() - t0, "tokens_per_forward": int(self.replay.input_ids.shape[1]),
                "measure": "ppl", "dense_ppl": dense_ppl}
        self.last_cost = {**meta, "cache": str(path), "hit": False}
        log.info("asvd_sensitivity: %d sequence-forwards in %.1f s (dense calibration perplexity %.3f)",
                 forwards, meta["seconds"], dense_ppl)
        if self.replay.use_cache:
            write_checked_json(path, {"fields": fields, "table": {k: [[p, v] for p, v in row.items()] for k, row in table.items()},
                                      "meta": meta})
        return table

    def _measure(self, n: int, keeps: list[float], factorizer: Any) -> tuple[dict[str, dict[float, float]], int, float]:
        r = self.replay
        ids = r.input_ids[:n]
        mask = None if r.attention_mask is None else r.attention_mask[:n]
        refs = [ids[lo: lo + r.batch_size] for lo in range(0, n, r.batch_size)]
        plans = {m.name: {rank_for(m.out_features, m.in_features, p) for p in keeps} - {None} for m in self.layout.modules}
        forwards = n * (1 + sum(len(ranks) for ranks in plans.values()))
        log.info("asvd_sensitivity: %d modules x %d candidates (%d distinct perturbations) x %d sequences of %d tokens "
                 "= %d sequence-forwards", len(plans), len(keeps), forwards // n - 1, n, ids.shape[1], forwards)
        home = next(self.model.parameters()).device
        self.model.to(self.device)
        swapped: dict[str, nn.Module] = {}
        try:
            with tqdm(total=forwards, desc=f"ASVD sensitivity ({forwards} seq-forwards)", unit="seq", leave=False) as bar:
                outs: list[list[Any]] | None = [[] for _ in self.layout.blocks] if r.skip_prefix else None
                dense_nll, _ = r._kl(refs, ids, mask, bar, record=outs)
                dense_ppl = math.exp(dense_nll)
                table: dict[str, dict[float, float]] = {}
                for mod in self.layout.modules:
                    dense = get_module(self.model, mod.name)
                    weight = dense.weight.detach().to(self.device, torch.float64)
                    stats = r._stats(mod.block)[mod.name]
                    by_rank: dict[int, float] = {}
                    for k in sorted(plans[mod.name]):
                        fact = factorizer.factorize(weight, stats, k)
                        if not torch.isfinite(fact.dense()).all():
                            raise FloatingPointError(f"asvd_sensitivity: non-finite factors for {mod.name} at rank {k}")
                        bias = None if dense.bias is None else dense.bias.detach()
                        swapped[mod.name] = dense
                        set_module(self.model, mod.name, fact.to_module(bias, dense.weight.dtype, dense.weight.device))
                        nll, _ = r._kl(refs, ids, mask, bar, start=mod.block if r.skip_prefix else 0, replay=outs)
                        set_module(self.model, mod.name, swapped.pop(mod.name))
                        by_rank[k] = math.exp(nll)
                    table[mod.name] = {p: by_rank.get(rank_for(mod.out_features, mod.in_features, p), dense_ppl)  # type: ignore[arg-type]
                                       for p in keeps}
        finally:
            for name, old in swapped.items():
                set_module(self.model, name, old)
            self.model.to(home)
        return table, forwards, dense_ppl


@register_probe("asvd_sensitivity")
def build(ctx: ProbeContext) -> PerplexitySensitivityProbe:
    """The probe for one session (building it runs nothing)."""
    return PerplexitySensitivityProbe(ctx.model, ctx.layout, ctx.load_block, ctx.input_ids, ctx.device, ctx.model_info,
                                      attention_mask=ctx.attention_mask)
