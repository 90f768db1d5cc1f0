"""AdaSVD (Li et al., arXiv 2502.01403): ``adasvd`` = adaCR + whitened + adaComp.

* allocator ``adacr`` (:mod:`methods.adacr`): per-block keep ratios from block importance
  ``1 - cos(block input, block output)``, Eq. (18)-(20) with ``trr - mrr = 0.1`` (Table 3(d)); a
  block whose retention reaches 1 stays dense; parameter-weighted mean equal to the target.
* factorizer ``whitened``: SVD-LLM's truncation-aware whitening of the dense Gram (Algorithm 1,
  lines 9-10: ``SVD(W S)`` then truncation), the start of adaComp.
* refiner ``adacomp`` (:mod:`methods.adacomp`): one alternating U / V^T least-squares iteration
  (Eq. (8)-(13), Table 3(c)) on the inputs of the model whose earlier blocks are already compressed,
  against the dense weight's output on those inputs (Eq. (4) as written).

Each component and each reading can be switched from a method string, with no new code:
``svd-llm+adacomp`` (no adaCR), ``svd-llm+adacr`` (no adaComp), ``adasvd+uniform``,
``adasvd+none``, ``adasvd[refiner.target=dense]`` (regress the dense model's output, the strongest
variant on a well-trained small decoder), ``adasvd[adacomp.iters=10,adacomp.inputs=dense]``.
"""

from __future__ import annotations

from methods.adacomp import AdaCompRefiner
from methods.adacr import AdaCRAllocator
from methods.method import register_method

__all__ = ["AdaCRAllocator", "AdaCompRefiner"]

# The components' defaults are the paper's reading (see their module docstrings). Stage options
# cannot be passed here: register_method's ``**options`` keys collide with its own ``allocator`` /
# ``factorizer`` / ``refiner`` parameters.
register_method("adasvd", "adacr", "whitened", "adacomp")
