"""Probe ``kl_sensitivity``: per-module KL deviation tables for Duo-SVD's allocator.

``probe(candidates, n_sequences, base_keep) -> {module_name: {keep: D}}`` (Duo-SVD's module sensitivity):

* base state: every target linear replaced by its rank-``k(base_keep)`` whitened truncation
  (SVD-LLM factors from the dense Grams);
* ``D_j(p)``: mean over calibration tokens of ``KL(P_dense || P_pert)`` of the next-token
  distributions, where the perturbed model is the base state with module ``j`` alone at keep ``p``
  (the original dense linear when ``p`` does not save storage); ``D_j(base_keep)`` is the base
  state's KL, computed once;
* the dense reference log-probs are computed once; the calibration subset is the first
  ``n_sequences`` windows of the session's calibration.

Encoders (no next-token distribution, e.g. MiniLM) get the analogous output deviation instead of
KL: the mean over real (unpadded) tokens of ``1 - cos(h_dense, h_pert)`` between final hidden
states, the per-token form of the ``embed-fidelity`` metric. The measure used is in ``last_cost``.

Cost: ``n_sequences x (2 + sum_j #distinct ranks of j's candidates other than the base rank)``
sequence-forwards. Two savings keep it down: candidates that give module ``j`` the same rank are
measured once, and (``skip_prefix``) a forward for a module of block ``b`` replays the base state's
cached output of block ``b - 1`` instead of recomputing blocks ``0..b-1``, which a perturbation in
block ``b`` cannot change. Tables are cached on disk under ``$SVDBENCH_CACHE/sensitivity/<key>.json`` (checksummed JSON)
(default ``~/.cache/svdbench``), keyed by the model content hash, dtype, calibration token hash,
candidates, ``n_sequences``, base keep and the target modules.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from harness.cache import cache_path, read_checked_json, write_checked_json
from harness.engine.capture import BlockStandIn, move
from harness.engine.models import Layout, get_module, set_module
from harness.engine.probes import ProbeContext, register_probe
from methods import Factorization, LinearStats, ModuleInfo, rank_for
from methods.svd_llm import WhitenedFactorizer

log = logging.getLogger(__name__)

PROBE_VERSION = 1  # bump when the definition of D changes (invalidates cached tables)


class _Replay(BlockStandIn):
    """Stands in for a block before the perturbed one: returns the base state's cached output of
    block ``b - 1`` for the current batch (blocks after it only see that)."""

    def __init__(self, block: nn.Module, outputs: list[Any], probe: KLSensitivityProbe) -> None:
        super().__init__(block)
        self._outputs, self._probe = outputs, probe

    def forward(self, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        return move(self._outputs[self._probe.batch_index], self._probe.device)


class KLSensitivityProbe:
    """The ``kl_sensitivity`` probe of one loaded model and calibration (module docstring).

    Args:
        model: The dense model (restored after every call; may live on the CPU between calls).
        layout: Its layout.
        load_block: ``f(block) -> {module name: LinearStats}``: one block's dense statistics (Grams
            for the whitened factors), read from the store.
        input_ids: ``(N, L)`` calibration windows; the first ``n_sequences`` are used.
        attention_mask: ``(N, L)`` 1 for real tokens (encoder paragraphs are padded), or None.
        device: Where the forwards and the factorizations run.
        model_info: The session's model fingerprint (``content_hash``, ``id``, ``revision``).
        batch_size: Sequences per forward.
        skip_prefix: Replay cached block outputs instead of recomputing unperturbed blocks.
        use_cache: Read and write the on-disk table cache.
    """

    def __init__(
        self, model: nn.Module, layout: Layout, load_block: Callable[[int], dict[str, LinearStats]], input_ids: Tensor,
        device: torch.device, model_info: dict[str, Any], batch_size: int = 8, skip_prefix: bool = True,
        use_cache: bool = True, attention_mask: Tensor | None = None,
    ) -> None:
        self.model, self.layout, self.load_block, self.input_ids = model, layout, load_block, input_ids
        self._loaded: tuple[int, dict[str, LinearStats]] | None = None
        self.attention_mask = attention_mask
        self.measure = "kl"  # set from the model's outputs on the first forward: "kl" or "cosine"
        self.device, self.batch_size, self.skip_prefix, self.use_cache = device, batch_size, skip_prefix, use_cache
        self.model_key = model_info.get("content_hash") or f"{model_info.get('id')}@{model_info.get('revision')}"
        self.batch_index = 0
        self.last_cost: dict[str, Any] = {}  # forwards, seconds, cache path, hit: for reports

    # -- public ---------------------------------------------------------------------------------
    def key_fields(self, ids: Tensor, candidates: Sequence[float], n_sequences: int, base_keep: float) -> dict[str, Any]:
        return {
            "version": PROBE_VERSION,
            "model": self.model_key,
            "dtype": str(next(self.model.parameters()).dtype),
            "calibration": hashlib.sha256(ids.to(torch.int64).numpy().tobytes()).hexdigest(),
            "shape": list(ids.shape),
            "candidates": sorted(float(c) for c in candidates),
            "n_sequences": n_sequences,
            "base_keep": float(base_keep),
            "modules": [[m.name, m.out_features, m.in_features] for m in self.layout.modules],
        }

    def __call__(self, candidates: Sequence[float], n_sequences: int = 32, base_keep: float = 0.6) -> dict[str, dict[float, float]]:
        """``{module_name: {keep: D}}`` for every target linear and every keep in ``candidates``.

        Args:
            candidates: Keep ratios in (0, 1]; ``base_keep`` is added when missing.
            n_sequences: Calibration windows to use (at most the session's).
            base_keep: Keep ratio of every other module (``1 - ratio``).

        Returns:
            The table; ``D`` is the mean per-token KL divergence (nats) from the dense model.
        """
        keeps = list(dict.fromkeys([*candidates, base_keep]))
        if n_sequences > self.input_ids.shape[0]:
            log.warning("kl_sensitivity: %d sequences requested, calibration has %d", n_sequences, self.input_ids.shape[0])
        ids = self.input_ids[:n_sequences]
        mask = None if self.attention_mask is None else self.attention_mask[:n_sequences]
        fields = self.key_fields(ids, keeps, ids.shape[0], base_keep)
        if mask is not None:
            fields["attention_mask"] = hashlib.sha256(mask.to(torch.int64).numpy().tobytes()).hexdigest()
        key = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:24]
        path = cache_path("sensitivity", key, ".json")
        saved = read_checked_json(path) if self.use_cache else None
        if saved is not None and saved.get("fields") == fields:
            self.last_cost = {**saved["meta"], "cache": str(path), "hit": True}
            log.info("kl_sensitivity: cached table %s (%d forwards, %.0f s when computed)",
                     path, saved["meta"]["forwards"], saved["meta"]["seconds"])
            table = {name: dict(map(tuple, rows)) for name, rows in saved["table"].items()}
            return {name: {k: row[k] for k in keeps} for name, row in table.items()}
        t0 = time.perf_counter()
        table, forwards = self._measure(ids, mask, keeps, base_keep)
        meta = {"forwards": forwards, "seconds": time.perf_counter() - t0, "tokens_per_forward": ids.shape[1],
                "measure": self.measure}
        self.last_cost = {**meta, "cache": str(path), "hit": False}
        log.info("kl_sensitivity: %d sequence-forwards in %.1f s", forwards, meta["seconds"])
        if self.use_cache:
            # JSON object keys are strings: each row is stored as [[keep, D], ...].
            rows = {name: [[k, d] for k, d in row.items()] for name, row in table.items()}
            write_checked_json(path, {"fields": fields, "table": rows, "meta": meta})
        return table

    # -- measurement ----------------------------------------------------------------------------
    def _plan(self, keeps: list[float], base_keep: float) -> dict[str, dict[int | None, list[float]]]:
        """Per module: distinct rank (None = dense) -> the candidates giving it, base rank excluded."""
        plan = {}
        for mod in self.layout.modules:
            base = rank_for(mod.out_features, mod.in_features, base_keep)
            groups: dict[int | None, list[float]] = {}
            for p in keeps:
                k = rank_for(mod.out_features, mod.in_features, p)
                if k != base:
                    groups.setdefault(k, []).append(p)
            plan[mod.name] = groups
        return plan

    def _stats(self, block: int) -> dict[str, LinearStats]:
        """One block's statistics; only the last block asked for stays in memory."""
        if self._loaded is None or self._loaded[0] != block:
            self._loaded = None  # free the previous block before reading the next
            self._loaded = (block, self.load_block(block))
        return self._loaded[1]

    def _factors(self, mod: ModuleInfo, dense: nn.Linear, k: int) -> Callable[[int], Factorization]:
        """SVD-LLM's whitened factorizer of one target linear at every rank up to ``k`` (one SVD of
        ``W T``, float64, on the probe's device)."""
        weight = dense.weight.detach().to(self.device, torch.float64)
        return WhitenedFactorizer().nested(weight, self._stats(mod.block)[mod.name], k)

    @staticmethod
    def _module(factors: Callable[[int], Factorization], rank: int, dense: nn.Linear) -> nn.Module:
        """The rank-``rank`` SVD-LLM truncation as a module with ``dense``'s bias, dtype and device."""
        bias = None if dense.bias is None else dense.bias.detach()
        return factors(rank).to_module(bias, dense.weight.dtype, dense.weight.device)

    @torch.no_grad()
    def _outputs(self, batch: Tensor, mask: Tensor | None) -> Tensor:
        """Per-token outputs compared by the probe: next-token log-probs ``(B, L, V)`` of a causal LM,
        else unit-norm final hidden states ``(B, L, d)`` of an encoder."""
        kwargs: dict[str, Any] = {"use_cache": False} if mask is None else {"attention_mask": mask}
        out = self.model(input_ids=batch, **kwargs)
        logits = getattr(out, "logits", None)
        if logits is not None:
            self.measure = "kl"
            return torch.log_softmax(logits.float(), dim=-1)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            raise RuntimeError("kl_sensitivity needs next-token logits (causal LM) or last_hidden_state (encoder)")
        self.measure = "cosine"
        return torch.nn.functional.normalize(hidden.float(), dim=-1)

    def _divergence(self, ref: Tensor, new: Tensor, mask: Tensor | None) -> Tensor:
        """Per real token: ``KL(P_ref || P_new)`` from log-probs, or ``1 - cos`` from unit vectors."""
        d = (ref.exp() * (ref - new)).sum(-1) if self.measure == "kl" else 1.0 - (ref * new).sum(-1)
        return d if mask is None else d[mask.bool()]

    @torch.no_grad()
    def _kl(self, ref: list[Tensor] | None, ids: Tensor, mask: Tensor | None, bar: tqdm, start: int = 0,
            replay: list[list[Any]] | None = None, record: list[list[Any]] | None = None) -> tuple[float, list[Tensor]]:
        """Mean per-token divergence of the current model from the dense one on ``ids``; with
        ``ref=None`` return the dense outputs instead.

        Args:
            ref: Dense outputs per batch (:meth:`_outputs`), or None to compute them.
            ids: ``(n, L)`` token windows.
            mask: ``(n, L)`` attention mask, or None (no padding).
            bar: Progress bar (counts sequence-forwards).
            start: First block actually run; blocks before it replay ``replay[start - 1]``.
            replay: Per block, per batch, the base state's block outputs.
            record: Empty per-block lists to fill with this run's block outputs (CPU).
        """
        blocks, saved = self.layout.blocks, []
        handles = []
        if start > 0:
            assert replay is not None
            for i in range(start):
                saved.append(blocks[i])
                blocks[i] = _Replay(saved[i], replay[start - 1], self)
        if record is not None:
            for i, block in enumerate(blocks[:-1]):  # the last block's output is never replayed
                handles.append(block.register_forward_hook(
                    lambda _m, _a, out, i=i: record[i].append(move(out, "cpu"))))
        total, count, dense_outputs = 0.0, 0, []
        try:
            for j, lo in enumerate(range(0, ids.shape[0], self.batch_size)):
                self.batch_index = j
                batch = ids[lo: lo + self.batch_size].to(self.device)
                batch_mask = None if mask is None else mask[lo: lo + self.batch_size].to(self.device)
                outputs = self._outputs(batch, batch_mask)
                if ref is None:
                    dense_outputs.append(outputs.cpu())
                else:
                    d = self._divergence(ref[j].to(self.device), outputs, batch_mask)
                    total, count = total + float(d.double().sum()), count + d.numel()
                bar.update(batch.shape[0])
        finally:
            for h in handles:
                h.remove()
            for i, block in enumerate(saved):
                blocks[i] = block
        return (total / max(count, 1)), dense_outputs

    def _measure(self, ids: Tensor, mask: Tensor | None, keeps: list[float], base_keep: float) -> tuple[dict[str, dict[float, float]], int]:
        plan = self._plan(keeps, base_keep)
        n = ids.shape[0]
        forwards = n * (2 + sum(len(g) for g in plan.values()))
        skipped = sum(len(plan[m.name]) * m.block for m in self.layout.modules) if self.skip_prefix else 0
        block_runs = n * (2 + sum(len(g) for g in plan.values())) * self.layout.n_blocks
        log.info("kl_sensitivity: %d modules x %d candidates (%d distinct perturbations) x %d sequences of %d tokens "
                 "= %d sequence-forwards; replaying unperturbed blocks skips %.0f%% of block forwards",
                 len(plan), len(keeps), forwards // n - 2, n, ids.shape[1], forwards, 100 * n * skipped / block_runs)
        home = next(self.model.parameters()).device
        self.model.to(self.device)
        originals: dict[str, nn.Module] = {}
        try:
            with tqdm(total=forwards, desc=f"KL sensitivity ({forwards} seq-forwards)", unit="seq", leave=False) as bar:
                _, ref = self._kl(None, ids, mask, bar)
                base_mods: dict[str, nn.Module] = {}
                for mod in self.layout.modules:
                    dense = get_module(self.model, mod.name)
                    k = rank_for(mod.out_features, mod.in_features, base_keep)
                    base_mods[mod.name] = dense if k is None else self._module(self._factors(mod, dense, k), k, dense)
                for name, new in base_mods.items():
                    originals[name] = set_module(self.model, name, new)
                outs: list[list[Any]] | None = [[] for _ in self.layout.blocks] if self.skip_prefix else None
                base_d, _ = self._kl(ref, ids, mask, bar, record=outs)
                table = {m.name: {p: base_d for p in keeps} for m in self.layout.modules}
                for mod in self.layout.modules:
                    groups = plan[mod.name]
                    if not groups:
                        continue
                    dense = originals[mod.name]
                    top = max(r for r in groups if r is not None) if any(r is not None for r in groups) else 1
                    svd = self._factors(mod, dense, top)  # type: ignore[arg-type]
                    for rank, ps in groups.items():
                        new = dense if rank is None else self._module(svd, rank, dense)  # type: ignore[arg-type]
                        set_module(self.model, mod.name, new)
                        start = mod.block if self.skip_prefix else 0
                        d, _ = self._kl(ref, ids, mask, bar, start=start, replay=outs)
                        for p in ps:
                            table[mod.name][p] = d
                    set_module(self.model, mod.name, base_mods[mod.name])
        finally:
            for name, old in originals.items():
                set_module(self.model, name, old)
            self.model.to(home)
        return table, forwards


@register_probe("kl_sensitivity")
def build(ctx: ProbeContext) -> KLSensitivityProbe:
    """The probe for one session (building it runs nothing)."""
    return KLSensitivityProbe(ctx.model, ctx.layout, ctx.load_block, ctx.input_ids, ctx.device, ctx.model_info,
                              attention_mask=ctx.attention_mask)
