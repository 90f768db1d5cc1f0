"""A basis shared by several linears: the module and factorisation record of Basis Sharing.

Each member linear computes ``y = C_l (B x) + b_l``: ``B: (k, n)`` is one ``nn.Parameter`` held by every
member of the group (so ``model.parameters()`` and ``count_params`` count it once), ``C_l: (m, k)``
and the bias are the member's own. :class:`SharedBasisFactorization` has the interface of
:class:`methods.lowrank.Factorization`; exactly one member of a group counts the basis in
``param_count`` (the first), so per-module reports add up to the real storage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from methods.lowrank import Factorization
from methods.module_types import register_module_type


class SharedBasis:
    """The basis ``B: (k, n)`` (float64) of one group and the one parameter that materialises it."""

    def __init__(self, basis: Tensor) -> None:
        self.basis = basis
        self._param: nn.Parameter | None = None

    def parameter(self, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
        """The group's parameter, created by the first member's ``to_module`` and reused by the others
        (the later ones may sit on another device until the engine moves their blocks home)."""
        if self._param is None or self._param.dtype != dtype:
            self._param = nn.Parameter(self.basis.to(device=device, dtype=dtype), requires_grad=False)
        return self._param


@register_module_type
class SharedBasisLinear(nn.Module):
    """``y = C (B x) + b`` with ``B`` shared by the group (module docstring).

    The basis is one ``nn.Parameter`` object in every member, so parameter counts and stored bytes
    (which keep each tensor once) count it once per group.
    """

    export_name: ClassVar[str] = "SharedBasisLinear"
    # Two matmuls like LowRankLinear, labelled apart so efficiency records tell shared-basis cells apart.
    forward_path: ClassVar[str] = "shared-basis"

    def __init__(self, basis: nn.Parameter, coeff: Tensor, bias: Tensor | None = None) -> None:
        """Build from the shared basis parameter ``B: (k, n)``, coefficients ``C: (m, k)`` and a bias ``(m,)``."""
        super().__init__()
        rank, in_f = basis.shape
        out_f, rank_c = coeff.shape
        if rank != rank_c:
            raise ValueError(f"basis rank {rank} != coefficient rank {rank_c}")
        self.in_features, self.out_features, self.rank = in_f, out_f, rank
        self.basis = basis
        self.second = nn.Linear(rank, out_f, bias=bias is not None, device=coeff.device, dtype=coeff.dtype)
        with torch.no_grad():
            self.second.weight.copy_(coeff)
            if bias is not None:
                self.second.bias.copy_(bias)

    @classmethod
    def from_shape(cls, in_features: int, out_features: int, rank: int, bias: bool = False,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SharedBasisLinear:
        """An uninitialised member of the given shape with a basis of its own, to load a state dict into;
        the loader then ties the members' bases again (an export stores each shared basis once)."""
        basis = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=dtype), requires_grad=False)
        return cls(basis, torch.empty(out_features, rank, device=device, dtype=dtype),
                   torch.empty(out_features, device=device, dtype=dtype) if bias else None)

    def export_spec(self) -> dict[str, Any]:
        """``in_features``, ``out_features``, ``rank``, ``bias``. The export stores the shared basis once
        (the other members are tied aliases), so the spec does not name the group."""
        # Key order is the export's (manifest bytes, hence checksums, follow it).
        return {"in_features": self.in_features, "out_features": self.out_features, "rank": int(self.rank),
                "bias": self.second.bias is not None}

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any], device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> SharedBasisLinear:
        """:meth:`from_shape` at the shape an :meth:`export_spec` records."""
        return cls.from_shape(int(spec["in_features"]), int(spec["out_features"]), int(spec["rank"]),
                              bool(spec["bias"]), device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.second(F.linear(x, self.basis))

    def dense_weight(self) -> Tensor:
        """``C B: (out, in)`` float64."""
        return self.second.weight.double() @ self.basis.double()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, shared_basis=True"


@dataclass
class SharedBasisFactorization(Factorization):
    """``W_l' = C_l B`` for one member of a basis-sharing group: a :class:`Factorization` whose ``b`` is
    the group's basis, materialised as one shared parameter.

    Attributes:
        a: ``C_l: (m, k)`` float64.
        b: ``B: (k, n)``, the group's basis (``shared.basis``).
        shared: The group's :class:`SharedBasis`.
        counts_basis: True for the one member whose ``param_count`` includes ``B``.
        spectrum: Singular values of the group's stacked whitened weights.
        info: JSON-able facts (group members, shared rank).
    """

    shared: SharedBasis | None = None
    counts_basis: bool = False

    @classmethod
    def member(cls, coeff: Tensor, shared: SharedBasis, counts_basis: bool, spectrum: Tensor | None = None,
               info: dict[str, object] | None = None) -> SharedBasisFactorization:
        return cls(coeff, shared.basis, spectrum=spectrum, info=dict(info or {}), shared=shared,
                   counts_basis=counts_basis)

    def param_count(self) -> int:
        """``m k``, plus ``k n`` for the member that carries the shared basis."""
        return int(self.a.numel() + (self.b.numel() if self.counts_basis else 0))

    def to_module(self, bias: Tensor | None, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
        if self.shared is None:
            raise ValueError("a shared-basis factorization needs its group's SharedBasis")
        b_ = None if bias is None else bias.detach().to(device=device, dtype=dtype)
        return SharedBasisLinear(self.shared.parameter(dtype, device), self.a.to(device=device, dtype=dtype), b_)
