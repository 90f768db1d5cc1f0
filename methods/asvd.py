"""ASVD (Yuan et al., arXiv 2312.05821): ``asvd`` = asvd-sensitivity allocator + asvd-scaling factorizer.

* ``asvd-scaling`` (factorizer, :mod:`methods.activation_aware`): truncate ``W diag(s)`` with
  ``s_j = mean|x_j|^alpha`` (statistic :class:`methods.activation_stats.InputAbsMean`) and undo the
  scaling on ``V`` (paper Sec. 3.2, alpha = 0.5).
* ``asvd-sensitivity`` (allocator, :mod:`methods.sensitivity_threshold`): per-module calibration
  perplexity at each candidate keep (engine probe ``asvd_sensitivity``), then the global threshold
  search for the parameter budget (paper Sec. 3.3).

Ablations: ``svd-llm+asvd-sensitivity`` (allocation only, whitened factors, measured with them),
``svd+asvd-scaling`` (scaling only, uniform ranks), ``asvd[asvd-scaling.alpha=1.0]``. The KV-cache
part of the paper is out of scope.
"""

from __future__ import annotations

from methods import activation_aware, sensitivity_threshold  # noqa: F401  (registration side effects)
from methods.method import register_method

register_method("asvd", "asvd-sensitivity", "asvd-scaling")
