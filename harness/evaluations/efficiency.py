"""``efficiency``: stored bytes, prefill peak memory and prefill / decode speed against the dense model.

Protocol ``efficiency@b{B}-prefill{P}-decode{D}`` (:class:`EfficiencyProtocol`): a batch of ``B``
random token sequences of ``P`` tokens (seeded; speed does not depend on the text) is prefilled with
the KV cache on, keeping only the last position's logits (what a server computes; the full
``P x vocab`` logits would add a large, compression-independent head cost), then ``D`` tokens are
decoded greedily, one forward per token on the cache. One trial times both phases; ``warmup``
trials are discarded and ``repeats`` are kept.

The dense model is measured once per run, by :func:`efficiency_reference` on the dense model
before any cell (the engine's ``REFERENCES`` hook); every compressed cell is measured the same way
and divided by it. Reported per phase: the speed-up (dense median time / compressed median time),
its interquartile interval (``q25(dense) / q75(compressed)`` to ``q75(dense) / q25(compressed)``),
and both time series' summaries. On a GPU the absolute tokens/s are reported too; on a CPU they are
left out because a shared CPU's absolute speed says little beyond the machine and its load (the
system load averages before and after are recorded instead).

Also reported: the stored bytes of the model (its state dict, tied tensors once) and of the target
linears, and the peak memory of one extra prefill: the CUDA allocator's peak, or on a CPU the peak
of live tensor bytes seen by the torch profiler (weights plus that peak). ``paths`` counts which
forward each target linear ran: ``dense`` (left ``nn.Linear`` because its rank would not save
storage) or the ``forward_path`` its replacement module type declares
(:mod:`methods.module_types`: ``two-matmul`` for ``LowRankLinear``, ``column-preserving`` for index
gathers plus three matmuls, ``shared-basis`` for a member of a basis-sharing group). A model whose
target linears are all ``dense`` is the dense model and gets the dense reference measurement.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor, nn

from harness.engine.models import find_blocks, max_positions
from harness.evaluations.registry import Evaluation, MetricSpec, register_evaluation
from methods.module_types import MODULE_TYPES

log = logging.getLogger(__name__)

REFERENCE_KEY = "efficiency_reference"


@dataclass(frozen=True)
class EfficiencyProtocol:
    """Settings of one efficiency measurement; the id names those that define the quantity.

    Attributes:
        batch: Sequences per forward.
        prefill: Prompt tokens per sequence.
        decode: Greedily decoded tokens per sequence (after the prompt).
        warmup: Discarded trials per model (allocator, kernel selection, caches).
        repeats: Kept trials per model.
        seed: Seed of the random prompt tokens.
    """

    batch: int = 1
    prefill: int = 512
    decode: int = 64
    warmup: int = 1
    repeats: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.batch, self.prefill, self.decode, self.repeats) < 1 or self.warmup < 0:
            raise ValueError(f"efficiency protocol needs positive sizes and repeats, got {self}")

    @property
    def protocol_id(self) -> str:
        return f"efficiency@b{self.batch}-prefill{self.prefill}-decode{self.decode}"

    def fit(self, positions: int | None) -> EfficiencyProtocol:
        """The protocol shrunk to a context of ``positions`` tokens (decode at most a quarter of it)."""
        if positions is None or self.prefill + self.decode <= positions:
            return self
        decode = max(1, min(self.decode, positions // 4))
        return replace(self, prefill=positions - decode, decode=decode)


DEFAULT_PROTOCOL = EfficiencyProtocol()


# -- timing ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clock:
    """Where time comes from: ``now()`` in seconds, ``sync()`` waits for queued device work."""

    now: Callable[[], float] = time.perf_counter
    sync: Callable[[], None] = lambda: None

    @classmethod
    def for_device(cls, device: torch.device) -> Clock:
        if device.type == "cuda":
            return cls(time.perf_counter, lambda: torch.cuda.synchronize(device))
        return cls()


def timed(fn: Callable[[], Any], clock: Clock) -> tuple[Any, float]:
    """``(fn(), seconds)``, with device work synchronised on both sides of the interval."""
    clock.sync()
    start = clock.now()
    result = fn()
    clock.sync()
    return result, clock.now() - start


def repeat_trials(trial: Callable[[], Sequence[float]], warmup: int, repeats: int) -> list[tuple[float, ...]]:
    """Run ``warmup`` discarded then ``repeats`` kept trials; each returns its phase times in seconds."""
    for _ in range(warmup):
        trial()
    return [tuple(trial()) for _ in range(repeats)]


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty sequence."""
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, mean, min, max, quartiles, standard deviation and relative spread of repeat times.

    ``rel_spread = (max - min) / median``: how far apart the repeats were, as a fraction.
    """
    if not seconds:
        raise ValueError("no repeats to summarise")
    med = statistics.median(seconds)
    return {
        "n": len(seconds),
        "median": med,
        "mean": statistics.fmean(seconds),
        "min": min(seconds),
        "max": max(seconds),
        "q25": _quantile(seconds, 0.25),
        "q75": _quantile(seconds, 0.75),
        "stdev": statistics.stdev(seconds) if len(seconds) > 1 else 0.0,
        "rel_spread": (max(seconds) - min(seconds)) / med if med > 0 else math.nan,
        "repeats": list(seconds),
    }


def speedup(dense: Sequence[float], compressed: Sequence[float]) -> dict[str, float]:
    """Speed-up of ``compressed`` over ``dense`` from their repeat times (seconds, lower is faster).

    Returns:
        ``speedup`` (median dense / median compressed) and the interquartile interval
        ``speedup_low = q25(dense) / q75(compressed)``, ``speedup_high = q75(dense) / q25(compressed)``.
    """
    return {
        "speedup": statistics.median(dense) / statistics.median(compressed),
        "speedup_low": _quantile(dense, 0.25) / _quantile(compressed, 0.75),
        "speedup_high": _quantile(dense, 0.75) / _quantile(compressed, 0.25),
    }


# -- what is measured ----------------------------------------------------------------------------------

def _forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Keep only the last position's logits when the model's forward can (transformers >= 4.45)."""
    params = inspect.signature(model.forward).parameters
    if "logits_to_keep" in params:
        return {"logits_to_keep": 1}
    if "num_logits_to_keep" in params:
        return {"num_logits_to_keep": 1}
    return {}


def _cache_name(model: nn.Module) -> str:
    """The KV-cache argument and output field: ``cache`` (transformers >= 5.2x) or ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def generation_trial(model: nn.Module, ids: Tensor, decode: int, clock: Clock) -> tuple[float, float]:
    """One prefill of ``ids: (B, P)`` with the KV cache, then ``decode`` greedy steps on it.

    Returns:
        ``(prefill seconds, decode seconds)``.
    """
    kwargs = _forward_kwargs(model)
    cache = _cache_name(model)
    with torch.inference_mode():
        out, prefill_s = timed(lambda: model(input_ids=ids, use_cache=True, **kwargs), clock)
        state = {"cache": getattr(out, cache), "next": out.logits[:, -1:].argmax(-1)}

        def loop() -> None:
            for _ in range(decode):
                step = model(input_ids=state["next"], use_cache=True, **{cache: state["cache"]}, **kwargs)
                state["cache"], state["next"] = getattr(step, cache), step.logits[:, -1:].argmax(-1)

        _, decode_s = timed(loop, clock)
    return prefill_s, decode_s


def target_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The target linears of a dense or compressed model: every top-level linear-like module in its blocks
    (``nn.Linear`` or a registered replacement module type, :data:`methods.module_types.MODULE_TYPES`).

    A replacement module counts once (its inner ``nn.Linear`` children are part of it).
    """
    path, blocks = find_blocks(model)
    found: dict[str, nn.Module] = {}
    for i, block in enumerate(blocks):
        for name, mod in block.named_modules():
            full = f"{path}.{i}.{name}"
            if any(full.startswith(f"{p}.") for p in found):
                continue
            if MODULE_TYPES.linear_like(mod):
                found[full] = mod
    return found


def forward_path(module: nn.Module) -> str:
    """Which forward a target linear runs: its module type's ``forward_path``, ``dense`` for ``nn.Linear``."""
    return MODULE_TYPES.forward_path(module)


def _tensor_bytes(tensors: Sequence[Tensor]) -> int:
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    total = 0
    for t in tensors:
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident not in seen:
            seen.add(ident)
            total += t.numel() * t.element_size()
    return total


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Stored bytes: the whole state dict (tied tensors once) and the target linears' share.

    Buffers in the state dict count (column-preserving index sets are stored); non-persistent
    buffers (rotary tables, recomputed at load) do not.
    """
    targets = [t for mod in target_modules(model).values() for t in mod.state_dict().values()]
    return {"model": _tensor_bytes(list(model.state_dict().values())), "targets": _tensor_bytes(targets)}


def _profiler_peak(events: Sequence[Any]) -> int:
    """Peak of live bytes over profiler events: each event's own allocations minus frees, in time order."""
    cur = peak = 0
    for ev in sorted(events, key=lambda e: (e.time_range.start, -e.time_range.end)):
        cur += int(ev.self_cpu_memory_usage)
        peak = max(peak, cur)
    return peak


def prefill_peak_memory(model: nn.Module, ids: Tensor, device: torch.device, weights: int) -> dict[str, Any]:
    """Peak memory of one prefill (untimed).

    Returns:
        ``total`` (bytes at the peak, weights included), ``activations`` (above what was allocated
        before the prefill: activations and KV cache) and ``kind`` (how it was measured).
    """
    kwargs = _forward_kwargs(model)
    with torch.inference_mode():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            model(input_ids=ids, use_cache=True, **kwargs)
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device)
            return {"total": int(peak), "activations": int(peak - before), "kind": "cuda_max_allocated"}
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            model(input_ids=ids, use_cache=True, **kwargs)
        live = _profiler_peak(prof.events())
        return {"total": weights + live, "activations": live, "kind": "cpu_profiler_live_tensors"}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on every platform
        return None


def measure(model: nn.Module, device: torch.device, proto: EfficiencyProtocol,
            clock: Clock | None = None) -> dict[str, Any]:
    """Everything the protocol measures on one model (already on ``device``).

    Returns:
        ``prefill_s`` and ``decode_s`` (kept repeat times), ``weight_bytes``, ``peak_prefill_bytes``,
        ``paths`` (target linears per forward path), ``loadavg`` before and after, ``measured_at``.
    """
    clock = clock or Clock.for_device(device)
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(proto.seed)
    ids = torch.randint(0, vocab, (proto.batch, proto.prefill), generator=gen).to(device)
    load_before = _loadavg()
    trials = repeat_trials(lambda: generation_trial(model, ids, proto.decode, clock), proto.warmup, proto.repeats)
    weights = weight_bytes(model)
    paths: dict[str, int] = {}
    for mod in target_modules(model).values():
        paths[forward_path(mod)] = paths.get(forward_path(mod), 0) + 1
    return {
        "prefill_s": [t[0] for t in trials],
        "decode_s": [t[1] for t in trials],
        "weight_bytes": weights,
        "peak_prefill_bytes": prefill_peak_memory(model, ids, device, weights["model"]),
        "paths": paths,
        "loadavg": {"before": load_before, "after": _loadavg()},
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def measure_interleaved(
    model: nn.Module,
    variants: Mapping[str, Mapping[str, nn.Module]],
    device: torch.device,
    proto: EfficiencyProtocol,
    clock: Clock | None = None,
) -> dict[str, dict[str, list[float]]]:
    """Trials of several module sets on one model, interleaved (a cross-check of the per-run protocol).

    Each round runs one trial of every variant, starting one variant later than the round
    before, so a change of machine load hits every variant alike instead of whichever ran during
    it. ``warmup`` rounds are discarded and ``repeats`` kept.

    Args:
        model: The model; its target linears are swapped in place.
        variants: ``{variant: {module name: module}}``, e.g. the dense linears and the
            replacement modules of each ratio (all on ``device``).
        device: Where the model runs.
        proto: Lengths, batch, warm-up and repeats.
        clock: Time source (tests pass a fake one).

    Returns:
        ``{variant: {"prefill_s": [...], "decode_s": [...]}}``; the model is left with the first
        variant's modules.
    """
    from harness.engine.models import set_module

    clock = clock or Clock.for_device(device)
    names = list(variants)
    ids = torch.randint(0, int(model.config.vocab_size), (proto.batch, proto.prefill),
                        generator=torch.Generator().manual_seed(proto.seed)).to(device)
    kept: dict[str, dict[str, list[float]]] = {v: {"prefill_s": [], "decode_s": []} for v in names}
    for r in range(proto.warmup + proto.repeats):
        for i in range(len(names)):
            variant = names[(r + i) % len(names)]
            for name, module in variants[variant].items():
                set_module(model, name, module)
            prefill_s, decode_s = generation_trial(model, ids, proto.decode, clock)
            if r >= proto.warmup:
                kept[variant]["prefill_s"].append(prefill_s)
                kept[variant]["decode_s"].append(decode_s)
    for name, module in variants[names[0]].items():
        set_module(model, name, module)
    return kept


def compare(dense: dict[str, Any], compressed: dict[str, Any], proto: EfficiencyProtocol,
            device: torch.device, dtype: str) -> dict[str, Any]:
    """The record's ``efficiency`` block: ``compressed`` against ``dense`` (both from :func:`measure`)."""
    phases: dict[str, Any] = {}
    for phase, tokens in (("prefill", proto.batch * proto.prefill), ("decode", proto.batch * proto.decode)):
        d, c = dense[f"{phase}_s"], compressed[f"{phase}_s"]
        block: dict[str, Any] = {**speedup(d, c), "tokens": tokens, "seconds": summarize(c), "dense_seconds": summarize(d)}
        if device.type == "cuda":  # absolute figures only where they mean something (module docstring)
            block["tokens_per_s"] = tokens / statistics.median(c)
            block["dense_tokens_per_s"] = tokens / statistics.median(d)
        phases[phase] = block
    wb, wd = compressed["weight_bytes"], dense["weight_bytes"]
    pb, pd = compressed["peak_prefill_bytes"], dense["peak_prefill_bytes"]
    return {
        "protocol": proto.protocol_id,
        "params": {**asdict(proto), "logits": "last position", "threads": torch.get_num_threads(),
                   "device": str(device), "dtype": dtype},
        "paths": compressed["paths"],
        "weight_bytes": {**wb, "model_dense": wd["model"], "targets_dense": wd["targets"],
                         "model_ratio": wb["model"] / wd["model"], "targets_ratio": wb["targets"] / wd["targets"]},
        "peak_prefill_bytes": {**pb, "dense_total": pd["total"], "dense_activations": pd["activations"]},
        **phases,
        "machine": {"loadavg": compressed["loadavg"], "measured_at": compressed["measured_at"],
                    "dense_loadavg": dense["loadavg"], "dense_measured_at": dense["measured_at"]},
    }


# -- the registered evaluation ---------------------------------------------------------------------------

def _model_dtype(model: nn.Module) -> str:
    return str(next(model.parameters()).dtype).removeprefix("torch.")


def efficiency_reference(model: nn.Module, cache: dict[str, Any], device: torch.device,
                         proto: EfficiencyProtocol = DEFAULT_PROTOCOL) -> None:
    """Measure the dense model once per run (a no-op when this run already has the measurement)."""
    proto = proto.fit(max_positions(model.config))
    refs = cache.setdefault(REFERENCE_KEY, {})
    if proto.protocol_id not in refs:
        log.info("efficiency: measuring the dense reference (%s)", proto.protocol_id)
        refs[proto.protocol_id] = measure(model, device, proto)


def efficiency(model: nn.Module, cache: dict[str, Any], device: torch.device,
               proto: EfficiencyProtocol = DEFAULT_PROTOCOL) -> dict[str, Any]:
    """The ``efficiency`` metrics of ``model`` against the run's dense reference.

    The dense model itself (no replaced module) gets the reference measurement, speed-up 1.

    Raises:
        RuntimeError: for a compressed model when no dense reference was measured in this run.
    """
    proto = proto.fit(max_positions(model.config))
    refs = cache.get(REFERENCE_KEY, {})
    is_dense = all(forward_path(m) == "dense" for m in target_modules(model).values())
    if is_dense:
        if proto.protocol_id not in refs:
            efficiency_reference(model, cache, device, proto)
        dense = cache[REFERENCE_KEY][proto.protocol_id]
        return compare(dense, dense, proto, device, _model_dtype(model))
    if proto.protocol_id not in refs:
        raise RuntimeError("efficiency needs the dense reference measurement; call efficiency_reference first")
    return compare(refs[proto.protocol_id], measure(model, device, proto), proto, device, _model_dtype(model))


def _metrics() -> tuple[MetricSpec, ...]:
    # Speed-ups over the dense model of the same run, stored bytes and prefill peak memory; absolute
    # tokens/s are recorded on GPUs only.
    return tuple(MetricSpec(f"efficiency.{f}", label, hib, kind) for f, label, hib, kind in (
        ("prefill.speedup", "Prefill ×", True, "score"),
        ("decode.speedup", "Decode ×", True, "score"),
        ("weight_bytes.model", "Weight bytes", False, "count"),
        ("weight_bytes.targets", "Target bytes", False, "count"),
        ("weight_bytes.model_ratio", "Bytes / dense", False, "score"),
        ("peak_prefill_bytes.total", "Prefill peak bytes", False, "count"),
        ("prefill.tokens_per_s", "Prefill tok/s", True, "score"),
        ("decode.tokens_per_s", "Decode tok/s", True, "score"),
    ))


register_evaluation(Evaluation(
    "efficiency",
    lambda model, tokenizer, s: efficiency(model, s.cache, s.device),
    metrics=_metrics(),
    aliases={"efficiency": "efficiency.decode.speedup", "decode_speedup": "efficiency.decode.speedup",
             "prefill_speedup": "efficiency.prefill.speedup", "weight_bytes": "efficiency.weight_bytes.model"},
    reference=lambda model, tokenizer, s: efficiency_reference(model, s.cache, s.device),
))
