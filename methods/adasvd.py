"""AdaSVD (Li et al., 2025; METHODS.md section 4): ``adasvd`` = adaCR + whitened + adaComp.

* allocator ``adacr`` (:mod:`methods.adacr`): per-block keep ratios from block importance
  ``1 - cos(block input, block output)``, parameter-weighted mean equal to the target.
* factorizer ``whitened``: SVD-LLM's truncation-aware whitening of the dense Gram (the start of
  adaComp, tau = 0 in the paper's figure).
* refiner ``adacomp`` (:mod:`methods.adacomp`): alternating U / V^T least squares on the inputs of
  the model whose earlier blocks are already compressed, against the dense outputs ``W X``.

Each component can be switched off or swapped from a method string, with no new code:
``svd-llm+adacomp`` (no adaCR), ``svd-llm+adacr`` (no adaComp), ``adasvd+uniform``,
``adasvd+none``, ``adasvd[adacomp.iters=5,adacomp.inputs=original]``.
"""

from __future__ import annotations

from methods.adacomp import AdaCompRefiner
from methods.adacr import AdaCRAllocator
from methods.method import register_method

__all__ = ["AdaCRAllocator", "AdaCompRefiner"]

# adacomp's defaults are the paper's configuration (inputs=compressed, init=factorizer, iters=10).
# (Stage options cannot be passed here: register_method's ``**options`` keys collide with its own
# ``allocator`` / ``factorizer`` / ``refiner`` parameters.)
register_method("adasvd", "adacr", "whitened", "adacomp")
