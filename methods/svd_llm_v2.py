"""SVD-LLM V2 (Wang et al., NAACL 2025, arXiv 2503.12340): ``svd-llm-v2`` = heterogeneous + eigen-whitened.

* ``eigen-whitened`` (factorizer, :mod:`methods.eigen_whitening`): the loss-optimised truncation
  through the eigendecomposition of ``H`` (no Cholesky; eigenvalues clamped at 1e-8 lambda_max).
* ``heterogeneous`` (allocator, :mod:`methods.heterogeneous`): per projection type, compression
  ratios from each matrix's truncation loss at the target ratio (``1 / log(L + offset)``, capped).

No code was released with the paper; both readings are stated in the component modules. The LoRA
fine-tuning stage is out of scope. Ablations: ``svd-llm+heterogeneous`` (allocation only),
``svd-llm+eigen-whitened`` (truncation only), ``svd-llm-v2[heterogeneous.offset=2.0]``.
"""

from __future__ import annotations

from methods import eigen_whitening, heterogeneous  # noqa: F401  (registration side effects)
from methods.method import register_method

register_method("svd-llm-v2", "heterogeneous", "eigen-whitened")
