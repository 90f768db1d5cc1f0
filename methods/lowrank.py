"""The replacement modules and the factorisation record every factorizer returns.

One ``LowRankLinear`` serves every method (evaluation, parameter counting and serialisation stay
method-agnostic). It replaces an ``nn.Linear`` only, never an attention or MLP class, so it works
for every model family without per-family copies of HF modules. It is a registered replacement
module type (:mod:`methods.module_types`): export, load and efficiency find it through the registry.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from methods.module_types import register_module_type


@register_module_type
class LowRankLinear(nn.Module):
    """``y = A (B x) + b`` with ``A: (out, rank)``, ``B: (rank, in)``; the bias stays dense.

    Stored as two ``nn.Linear`` children (``first`` = B, ``second`` = A) so that the usual
    dtype/device moves, ``state_dict`` and lm-eval's ``model.eval()`` handle it unchanged.
    """

    export_name: ClassVar[str] = "LowRankLinear"
    forward_path: ClassVar[str] = "two-matmul"

    def __init__(self, a: Tensor, b: Tensor, bias: Tensor | None = None) -> None:
        """Build from factors.

        Args:
            a: ``A: (out, rank)``.
            b: ``B: (rank, in)``.
            bias: ``(out,)`` or None.
        """
        super().__init__()
        out_f, rank = a.shape
        rank_b, in_f = b.shape
        if rank != rank_b:
            raise ValueError(f"factor ranks differ: A {tuple(a.shape)}, B {tuple(b.shape)}")
        self._build(in_f, out_f, rank, bias is not None, b.device, b.dtype)
        # A's device and dtype win for the second factor (the engine passes both alike).
        self.second.to(device=a.device, dtype=a.dtype)
        with torch.no_grad():
            self.first.weight.copy_(b)
            self.second.weight.copy_(a)
            if bias is not None:
                self.second.bias.copy_(bias)

    @classmethod
    def from_shape(
        cls,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> LowRankLinear:
        """An uninitialised module of the given shape, to load a state dict into.

        ``device="meta"`` allocates nothing (loading with ``load_state_dict(..., assign=True)``
        then adopts the stored tensors), so a compressed checkpoint is rebuilt without ever
        materialising the dense weights.

        Args:
            in_features: ``n``.
            out_features: ``m``.
            rank: ``k``; ``first.weight: (k, n)``, ``second.weight: (m, k)``.
            bias: Whether ``second`` has a bias ``(m,)``.
            device: Where to allocate (``"meta"`` for none).
            dtype: Parameter dtype.
        """
        if min(in_features, out_features, rank) < 1:
            raise ValueError(f"need positive sizes, got in={in_features}, out={out_features}, rank={rank}")
        mod = cls.__new__(cls)
        nn.Module.__init__(mod)
        mod._build(in_features, out_features, rank, bias, device, dtype)
        return mod

    def _build(self, in_f: int, out_f: int, rank: int, bias: bool, device: torch.device | str | None,
               dtype: torch.dtype | None) -> None:
        self.in_features, self.out_features, self.rank = in_f, out_f, rank
        self.first = nn.Linear(in_f, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(rank, out_f, bias=bias, device=device, dtype=dtype)

    def export_spec(self) -> dict[str, Any]:
        """``in_features``, ``out_features``, ``rank``, ``bias``: what :meth:`from_spec` rebuilds it from."""
        # Key order is the export's (manifest bytes, hence checksums, follow it).
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": int(self.rank),
                "bias": self.second.bias is not None}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> LowRankLinear:
        """:meth:`from_shape` at the shape an :meth:`export_spec` records."""
        return cls.from_shape(int(spec["in_features"]), int(spec["out_features"]), int(spec["rank"]),
                              bool(spec["bias"]), device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> Tensor:
        """``A B: (out, in)`` in float64 (for tests and error accounting)."""
        return self.second.weight.double() @ self.first.weight.double()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


@dataclass
class Factorization:
    """What a factorizer returns for one ``(m, n)`` weight: ``W' = A B`` plus optional extras.

    Attributes:
        a: ``A: (m, k)`` float64.
        b: ``B: (k, n)`` float64.
        spectrum: Singular values the factorizer truncated (whitened or plain), for reports.
        info: Small JSON-able facts (e.g. whitening fallback, split ranks).
    """

    a: Tensor
    b: Tensor
    spectrum: Tensor | None = None
    info: dict[str, object] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return int(self.a.shape[1])

    def dense(self) -> Tensor:
        """``W': (m, n)`` float64."""
        return self.a.double() @ self.b.double()

    def param_count(self) -> int:
        """Stored weight parameters (bias excluded: it is kept dense by every method)."""
        return int(self.a.numel() + self.b.numel())

    def to_module(self, bias: Tensor | None, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        """Materialise as a :class:`LowRankLinear` in the model's dtype and device."""
        b_ = None if bias is None else bias.detach().to(device=device, dtype=dtype)
        return LowRankLinear(self.a.to(device=device, dtype=dtype), self.b.to(device=device, dtype=dtype), b_)
