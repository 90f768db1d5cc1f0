"""Duo-SVD: ``duo-svd`` = KL-knapsack allocator + column-preserving factorizer.

"Beyond Uniform SVD: Dual-Level Optimization across Columns and Modules for LLM Compression"
(official code: Pupu792/CPSVD). Two independent parts, each a registered component so that they
compose with the rest of the registry:

* ``column-preserving`` (factorizer, :mod:`methods.column_preserving`): per matrix, trade SVD rank
  for exact dense input columns at equal storage; never worse than whitened truncation on the
  calibration data.
* ``kl-knapsack`` (allocator, :mod:`methods.knapsack`): per-module keep ratios from a
  multiple-choice knapsack over KL deviations measured by the engine probe ``kl_sensitivity``.

Ablations need no code: ``svd-llm+column-preserving`` (columns only), ``svd-llm+kl-knapsack``
(allocation only, whitened factors), ``duo-svd`` (both), e.g.
``duo-svd[kl-knapsack.n_sequences=16,column-preserving.min_gain=0.01]``.
"""

from __future__ import annotations

from methods import column_preserving, knapsack  # noqa: F401  (registration side effects)
from methods.method import register_method

register_method("duo-svd", "kl-knapsack", "column-preserving")
