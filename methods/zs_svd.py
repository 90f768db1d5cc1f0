"""ZS-SVD, Zero-Sum SVD (Abbasi et al., ICML 2026, arXiv 2602.02848): ``zs-svd`` = zero-sum + whitened.

* ``zero-sum`` (allocator, :mod:`methods.zero_sum`): every whitened singular component of the model
  scored by its first-order calibration-loss change ``-s_i u_i^T (G T^{-T}) v_i`` (``G`` the mean
  next-token-loss gradient, :mod:`methods.gradient_sum`), dropped from each module's tail by the
  two-heap zero-sum rule until the parameter budget is met: heterogeneous ranks, no search.
* ``whitened`` (factorizer, :mod:`methods.svd_llm`): SVD-LLM's truncation at those ranks, as in the
  official code (``factorize_linear`` with the Cholesky whitening).

Read from the official code (github mint-vu/Zero-Sum-SVD), one-shot pipeline
(``scripts/run_one_shot.sh``); the multi-stage correction and int8 remap are out of scope. Needs a
causal LM (one forward and backward per calibration window). Ablations: ``svd-llm+zero-sum``
is this method; ``zs-svd[zero-sum.order=second-order]``, ``zs-svd[zero-sum.min_rank_fraction=0.1]``,
``zs-svd+eigen-whitened``.
"""

from __future__ import annotations

from methods import svd_llm, zero_sum  # noqa: F401  (registration side effects)
from methods.method import register_method

register_method("zs-svd", "zero-sum", "whitened")
