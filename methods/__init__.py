"""svdbench compressors: pure tensor math plus one small file per method.

Importing this package registers the built-in components and named methods. Nothing here imports
the engine (``harness``), ``datasets`` or ``lm_eval``.
"""

from __future__ import annotations

from methods import (  # noqa: F401  (registration side effects)
    adasvd,
    asvd,
    basis_sharing,
    dobi_svd,
    duo_svd,
    fwsvd,
    gfwsvd,
    kfac_svd,
    last_layers,
    ressvd,
    svd,
    svd_llm,
    svd_llm_v2,
    swift_svd,
    zs_svd,
)
from methods.components import (
    ALLOCATORS,
    FACTORIZERS,
    REFINERS,
    AllocationContext,
    LinearStats,
    ModuleInfo,
)
from methods.lowrank import Factorization, LowRankLinear
from methods.method import METHODS, Method, parse_method, rank_for, register_method, split_method_list
from methods.registry import UnknownNameError

__all__ = [
    "ALLOCATORS",
    "FACTORIZERS",
    "METHODS",
    "REFINERS",
    "AllocationContext",
    "Factorization",
    "LinearStats",
    "LowRankLinear",
    "Method",
    "ModuleInfo",
    "UnknownNameError",
    "parse_method",
    "rank_for",
    "register_method",
    "split_method_list",
]
