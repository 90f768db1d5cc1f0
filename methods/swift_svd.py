"""Swift-SVD (Qi et al., ICML 2026, arXiv 2604.01609): ``swift-svd`` = swift-dynamic + output-covariance.

* ``output-covariance`` (factorizer, :mod:`methods.output_covariance`): ``W' = Q_k Q_k^T W`` from one
  eigendecomposition of ``C_y = W H W^T``; the exact minimiser of ``||(W - W') X||_F`` (SVD-LLM's
  truncation when ``H`` is positive definite, without Cholesky, inverse or eigenvalue floor).
* ``swift-dynamic`` (allocator, :mod:`methods.swift_allocation`): per projection type, ranks shared
  by layer importance (block influence) and output energy, ``I^0.6 log(1 + ||W X||_F)^0.4``, half of
  the uniform budget as a base.

Read from the official code (github hiahei/Swift-SVD, ``run_dynamic.sh``). The KV-cache variant and
the paper's throughput setup are out of scope. Ablations: ``svd-llm+output-covariance`` (uniform
ranks: the same model as ``svd-llm`` up to rounding), ``swift-svd+uniform`` (the code's
``run_uniform.sh``), ``swift-svd[swift-dynamic.alpha=0.0]`` (energy only).
"""

from __future__ import annotations

from methods import output_covariance, swift_allocation  # noqa: F401  (registration side effects)
from methods.method import register_method

register_method("swift-svd", "swift-dynamic", "output-covariance")
