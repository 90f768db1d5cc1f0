"""The evaluation engine: named evaluations run on an in-memory (dense or compressed) model.

Each evaluation is a function ``(model, tokenizer, settings) -> dict`` registered under its name;
its result lands in the record under ``metrics[name]`` and always carries a ``protocol`` id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harness.perplexity import PROTOCOLS, evaluate_protocol
from methods.registry import Registry


@dataclass
class EvalSettings:
    """Settings shared by the evaluations of one run.

    Attributes:
        seqlen: Perplexity window length.
        batch_size: Windows (or lm-eval requests) per forward.
        max_windows: Perplexity smoke limit (recorded in the protocol id), or None.
        window_stride: Perplexity on every k-th window only (a named subset, ``:every{k}`` in the id).
        limit: lm-eval ``--limit`` (recorded; such records are refused by leaderboards), or None.
        tasks: lm-eval task names for ``zeroshot`` (None = default set).
        seed: Seed handed to evaluations that sample.
        device: Where the model runs.
        cache: Per-run cache (tokenized texts, dense references) shared by all cells.
        forward: Set by the engine when the model does not fit on the device: batches of token
            windows -> logits, streaming the blocks (:mod:`harness.engine.offload`); None when the
            model is resident.
    """

    seqlen: int
    batch_size: int = 8
    max_windows: int | None = None
    limit: int | None = None
    tasks: tuple[str, ...] | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache: dict[str, Any] = field(default_factory=dict)
    forward: Callable[..., Any] | None = None
    window_stride: int | None = None


Evaluation = Callable[[nn.Module, Any, EvalSettings], dict[str, Any]]
EVALUATIONS: Registry[Evaluation] = Registry("evaluation")
# Checks that run before any model is loaded (data present, packages importable).
PREFLIGHT: dict[str, Callable[[], None]] = {}


def _perplexity_eval(name: str) -> Evaluation:
    def run(model: nn.Module, tokenizer: Any, s: EvalSettings) -> dict[str, Any]:
        tokens = s.cache.setdefault("tokens", {})
        return evaluate_protocol(name, model, tokenizer, s.seqlen, s.device, s.batch_size, s.max_windows, tokens,
                                 s.forward, s.window_stride)

    return run


for _name, _proto in PROTOCOLS.items():
    EVALUATIONS.register(_name, _perplexity_eval(_name))
    PREFLIGHT[_name] = lambda p=_proto: p.rows() and None


# Evaluations that compare against the dense model compute their reference here, once per run,
# on the dense model before any cell is compressed.
REFERENCES: dict[str, Callable[[nn.Module, Any, EvalSettings], None]] = {}
# Evaluations that need a causal LM (next-token logits); an encoder is refused before loading.
CAUSAL_ONLY = set(PROTOCOLS) | {"zeroshot"}


def _embed_fidelity(model: nn.Module, tokenizer: Any, s: EvalSettings) -> dict[str, Any]:
    from harness.embedding import embed_fidelity

    return embed_fidelity(model, tokenizer, s.cache, s.device)


def _embed_reference(model: nn.Module, tokenizer: Any, s: EvalSettings) -> None:
    from harness.embedding import embed_reference

    embed_reference(model, tokenizer, s.cache, s.device)


EVALUATIONS.register("embed-fidelity", _embed_fidelity)
REFERENCES["embed-fidelity"] = _embed_reference
PREFLIGHT["embed-fidelity"] = PREFLIGHT["wikitext2"]


def _efficiency(model: nn.Module, tokenizer: Any, s: EvalSettings) -> dict[str, Any]:
    from harness.efficiency import efficiency

    return efficiency(model, s.cache, s.device)


def _efficiency_reference(model: nn.Module, tokenizer: Any, s: EvalSettings) -> None:
    from harness.efficiency import efficiency_reference

    efficiency_reference(model, s.cache, s.device)


# Speed and bytes against the dense model, measured once per run (harness/efficiency.py).
EVALUATIONS.register("efficiency", _efficiency)
REFERENCES["efficiency"] = _efficiency_reference
CAUSAL_ONLY.add("efficiency")


def compute_references(names: list[str], model: nn.Module, tokenizer: Any, settings: EvalSettings) -> None:
    """Dense-model references of the named evaluations (no-op for those without one)."""
    model.eval()
    for name in names:
        if name in REFERENCES:
            REFERENCES[name](model, tokenizer, settings)


def _zeroshot(model: nn.Module, tokenizer: Any, s: EvalSettings) -> dict[str, Any]:
    # Imported here: lm_eval (and datasets) may be absent on some GPU images; everything else
    # in the harness must still import and run.
    from harness.zeroshot import evaluate_zeroshot

    try:
        return evaluate_zeroshot(model, tokenizer, s.tasks, limit=s.limit, batch_size=s.batch_size, seed=s.seed)
    except AssertionError as exc:
        # lm-eval asserts when a choice's continuation alone is longer than the model's context
        # (e.g. long PIQA solutions on a 256-position model); it cannot score such documents.
        limit = getattr(model.config, "max_position_embeddings", None)
        raise ValueError(
            f"lm-eval could not score a document of tasks {s.tasks or 'default'}: a continuation is longer "
            f"than the model's context ({limit} positions). Use a model with a longer context or other tasks."
        ) from exc


def _zeroshot_preflight() -> None:
    from harness.zeroshot import lm_eval_version

    lm_eval_version()  # raises ZeroShotDependencyError naming the missing package


EVALUATIONS.register("zeroshot", _zeroshot)
PREFLIGHT["zeroshot"] = _zeroshot_preflight


def preflight(names: list[str], encoder: bool = False) -> None:
    """Fail fast for unknown evaluations, missing data / packages, or an evaluation the model
    type cannot take (perplexity of an encoder), before loading a model."""
    for name in names:
        if encoder and name in CAUSAL_ONLY:
            raise ValueError(f"evaluation {name!r} needs a causal LM, but the model is an encoder; use --eval embed-fidelity")
        EVALUATIONS.get(name)
        check = PREFLIGHT.get(name)
        if check is not None:
            check()


def run_evaluations(names: list[str], model: nn.Module, tokenizer: Any, settings: EvalSettings) -> dict[str, Any]:
    """Run each named evaluation; returns ``{name: result}``."""
    model.eval()
    return {name: EVALUATIONS.get(name)(model, tokenizer, settings) for name in names}


__all__ = ["EVALUATIONS", "EvalSettings", "compute_references", "preflight", "run_evaluations"]
