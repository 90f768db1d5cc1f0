"""Probes: measurements that run the model on behalf of an allocator, built on demand.

An allocator declares the probes it calls by name (``probes = ("kl_sensitivity",)``); the session
builds exactly those, from this registry, and hands them to the allocator as
``AllocationContext.probes[name]``. Building a probe runs nothing; a probe runs the model only when
the allocator calls it. Each probe module registers itself with :func:`register_probe`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from harness.engine.models import Layout
from methods import LinearStats
from methods.registry import Registry


@dataclass(frozen=True)
class ProbeContext:
    """What a probe may use: the loaded model, its calibration and its stored statistics.

    Attributes:
        model: The dense model.
        layout: Its layout.
        input_ids: ``(N, L)`` calibration windows.
        attention_mask: ``(N, L)`` with 1 for real tokens, or None.
        device: The compute device.
        model_info: The model's fingerprint (id, revision, content hash).
        load_block: ``f(block) -> {module name: LinearStats}`` from the statistics store.
    """

    model: nn.Module
    layout: Layout
    input_ids: Tensor
    attention_mask: Tensor | None
    device: torch.device
    model_info: dict[str, Any]
    load_block: Callable[[int], dict[str, LinearStats]]


PROBES: Registry[Callable[[ProbeContext], Any]] = Registry("probe")
_MODULES = ("harness.engine.probes.kl_sensitivity", "harness.engine.probes.asvd_sensitivity",
            "harness.engine.probes.dobi_training")


def register_probe(name: str) -> Callable[[Callable[[ProbeContext], Any]], Callable[[ProbeContext], Any]]:
    """Decorator: register a probe builder ``f(ctx) -> probe`` under ``name``."""
    return PROBES.register(name)  # type: ignore[return-value]


def build_probes(names: tuple[str, ...], ctx: ProbeContext) -> dict[str, Any]:
    """The declared probes, built for one session."""
    for module in _MODULES:
        importlib.import_module(module)
    return {name: PROBES.get(name)(ctx) for name in names}
