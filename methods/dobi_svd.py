"""Dobi-SVD (arXiv 2502.02723, ICLR 2025): ``dobi-svd`` = ``dobi-gamma`` + ``dobi-ipca``.

* ``dobi-gamma`` (allocator): trains one truncation position ``gamma_j`` per target linear through the
  whole model with soft-truncated activations (:func:`methods.dobi.soft_truncate`), the weights
  frozen; the engine probe ``dobi_training`` (``harness/engine/probes/dobi_training.py``) runs it.
  The learned ``gamma_j`` gives the stored rank ``r_j = floor(ceil(gamma_j) scale_j)`` and the keep
  ``r_j (m + n) / (m n)``.
* ``dobi-ipca`` (factorizer): ``W' = V V^T W`` with ``V`` the incremental-PCA subspace of the
  per-window top singular vectors of the layer's outputs (:func:`methods.dobi.ipca_basis`), stored as
  a rank-``r`` pair. Its statistic is :class:`WindowGrams`: one input Gram per calibration window,
  by default of the inputs the model whose earlier blocks are compressed gives (the paired stream:
  the official code collects the outputs of the truncated model).

Every factorization reports, under its layer's ``info.storage_params``, its storage with Dobi-SVD's
remapping (:func:`methods.dobi.remap_params`); the engine sums it into the record's
``storage_compressed`` and ``achieved_ratio_storage`` beside the parameter ratio.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from methods.components import AllocationContext, LinearStats, ModuleInfo, check_choices, register
from methods.dobi import (
    covariance_basis,
    gamma_scale,
    gram_root,
    ipca_basis,
    project_factors,
    remap_params,
    stored_rank,
)
from methods.lowrank import Factorization
from methods.method import register_method
from methods.statistics import Accumulator, CompressedPrefixGrams, GramProduct, Statistic

PROBE = "dobi_training"


# -- the statistic -----------------------------------------------------------------------------

class _WindowGramAcc:
    def __init__(self, n: int, device: torch.device, product: GramProduct, paired: bool, max_windows: int) -> None:
        self.n, self.device, self.product, self.paired, self.max_windows = n, device, product, paired, max_windows
        self.grams: list[Tensor] = []
        self.tokens: list[int] = []

    def add(self, x: Tensor, mask: Tensor | None, batch: int, xh: Tensor | None = None) -> None:
        src = xh if self.paired else x
        if src is None:
            raise ValueError("window Grams of the compressed stream need the paired input")
        for i in range(src.shape[0]):  # one Gram per window: the per-window SVD needs it
            if len(self.grams) >= self.max_windows:
                return
            rows = src[i] if mask is None else src[i][mask[i].bool()]
            self.grams.append(self.product(rows, rows))
            self.tokens.append(int(rows.shape[0]))

    def result(self) -> dict[str, Tensor]:
        grams = torch.stack(self.grams) if self.grams else torch.zeros(0, self.n, self.n, dtype=torch.float64,
                                                                        device=self.device)
        return {"gram_windows": grams, "window_tokens": torch.tensor(self.tokens, dtype=torch.int64)}


@dataclass(frozen=True)
class WindowGrams:
    """``H_s = X_s^T X_s: (S, n, n)`` float64, one per calibration window, and its token counts ``(S,)``.

    Options:
        stream: ``paired`` (inputs of the model whose earlier blocks are compressed; kept in memory
            one block at a time, never cached) or ``dense`` (the dense model's; cached on disk).
        max_windows: Windows kept (the first ones); memory ``S n^2`` float64 per distinct input.
    """

    stream: str = "paired"
    max_windows: int = 256
    scope: ClassVar[str] = "linear-input"
    names: ClassVar[tuple[str, ...]] = ("gram_windows", "window_tokens")

    @property
    def key(self) -> str:
        return f"window-grams-{self.stream}-{self.max_windows}"

    def accumulator(self, n: int, device: torch.device, product: GramProduct) -> Accumulator:
        return _WindowGramAcc(n, device, product, self.stream == "paired", self.max_windows)


# -- the allocator -----------------------------------------------------------------------------

def keep_for_rank(mod: ModuleInfo, rank: int) -> float:
    """Parameter keep whose harness rank (``floor(keep m n / (m + n))``) is ``rank``; 1 (dense) when
    the pair would not save parameters."""
    m, n = mod.out_features, mod.in_features
    return min(1.0, rank * (m + n) / (m * n))


@register("allocator")
@dataclass(frozen=True)
class DobiGammaAllocator:
    """Dobi-SVD's differentiable truncation positions (module docstring), trained by the engine.

    Loss per step (one window, batch 1): ``exp(NLL) + lambda |keep(gamma) - (1 - ratio)|
    + sum_j relu(-gamma_j)^2 + relu(gamma_j - gamma_max_j)^2`` with ``keep(gamma) = sum_j
    min(c_j gamma_j scale_j, m_j n_j) / sum_j m_j n_j`` (``c = m + n``, or ``max(m, n)`` with
    ``remap``). Adam on the ``gamma_j`` only, cosine annealing from ``lr`` to ``min_lr`` with period
    ``2 n_sequences`` steps (the official ``CosineAnnealingLR(T_max = steps per epoch)``).

    Options:
        epochs: Passes over the windows (official default 20).
        n_sequences: Calibration windows trained on (official 256 of 2048 tokens; here the first
            ``n_sequences`` of the run's calibration, whose length sets the gamma unit).
        lr: Adam learning rate on gamma (official 5).
        min_lr: Floor of the cosine schedule (official ``scheduler_min_lr`` 4).
        beta: Steepness of the soft step (official 10).
        lambda_reg: Weight of the ratio term (official default 200; the shipped configs 150).
        remap: Count storage as remapped 8-bit factors, ``max(m, n)`` per rank (official flag,
            default off). The harness stores the factors unquantized: ``remap=true`` only moves the
            budget; a module whose rank no longer saves parameters stays dense.
        window: Singular triplets computed beyond ``int(gamma)`` (official 5).
        save_every: Steps between checkpoints of gamma (official ``save_epoch_num`` 8).
        select: ``best`` (the checkpoint of least total loss, the official ``best_gamma.json`` the
            weight update reads) or ``last``.
        seed: Seed of the window order shuffle of each epoch (the Trainer's shuffle).
        init_keep: Keep ratio of the starting gammas (None: the target, the official initialisation).
    """

    name: ClassVar[str] = "dobi-gamma"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"select": ("best", "last")}
    probes: ClassVar[tuple[str, ...]] = (PROBE,)
    uses_calibration: ClassVar[bool] = True
    requires_causal_lm: ClassVar[str] = "trains truncation positions on the next-token loss"
    epochs: int = 20
    n_sequences: int = 256
    lr: float = 5.0
    min_lr: float = 4.0
    beta: float = 10.0
    lambda_reg: float = 200.0
    remap: bool = False
    window: int = 5
    save_every: int = 8
    select: str = "best"
    seed: int = 0
    init_keep: float | None = None

    def __post_init__(self) -> None:
        check_choices(self)
        if self.init_keep is not None and not 0.0 < self.init_keep <= 1.0:
            raise ValueError("init_keep must lie in (0, 1]")
        if self.epochs < 1 or self.n_sequences < 1 or self.lr <= 0 or self.min_lr < 0 or self.beta <= 0:
            raise ValueError("need epochs >= 1, n_sequences >= 1, lr > 0, min_lr >= 0, beta > 0")
        if self.window < 1 or self.save_every < 1 or self.lambda_reg < 0:
            raise ValueError("need window >= 1, save_every >= 1, lambda_reg >= 0")

    def allocate(self, ctx: AllocationContext, ratio: float) -> dict[str, float]:
        if PROBE not in ctx.probes:
            raise RuntimeError(f"allocator {self.name!r} needs the engine probe {PROBE!r}; run it through the harness")
        trained = ctx.probes[PROBE](self, 1.0 - ratio)
        return self.keeps(ctx.modules, trained["gammas"], int(trained["seq_len"]))

    @staticmethod
    def keeps(modules: list[ModuleInfo], gammas: dict[str, float], seq_len: int) -> dict[str, float]:
        """Keep ratio per module from the learned positions (rank :func:`methods.dobi.stored_rank`)."""
        out = {}
        for mod in modules:
            m, n = mod.out_features, mod.in_features
            rank = stored_rank(gammas[mod.name], m, n, gamma_scale(m, n, seq_len))
            out[mod.name] = keep_for_rank(mod, rank)
        return out


# -- the factorizer ----------------------------------------------------------------------------

@register("factorizer")
@dataclass(frozen=True)
class DobiIPCAFactorizer:
    """Dobi-SVD's weight update ``W' = V V^T W`` at the allocated rank (module docstring).

    Options:
        subspace: ``ipca`` (default, the official reading: incremental PCA of the per-window top
            right singular vectors of ``A_s = X_s W^T``, unweighted) or ``covariance`` (top-``k``
            eigenvectors of ``sum_s A_s^T A_s``: the exact top-``k`` output subspace, which with
            ``V V^T W`` is SVD-LLM's truncation).
        inputs: ``compressed`` (default: inputs of the model whose earlier blocks are compressed, the
            paired stream; the official code collects on the truncated model) or ``dense``.
        center: Mean-centre the stacked singular vectors in the incremental PCA. Default False: the
            official IPCA centres, but its singular vectors come from a randomized SVD and so carry
            random signs, which makes their mean vanish on average; with a deterministic SVD the
            signs are consistent and centring would remove the common direction. Uncentred, the
            result does not depend on the signs.
        max_windows: Calibration windows whose Grams are kept (official 256 samples).
    """

    name: ClassVar[str] = "dobi-ipca"
    choices: ClassVar[dict[str, tuple[str, ...]]] = {"subspace": ("ipca", "covariance"),
                                                      "inputs": ("compressed", "dense")}
    subspace: str = "ipca"
    inputs: str = "compressed"
    center: bool = False
    max_windows: int = 256

    def __post_init__(self) -> None:
        check_choices(self)
        if self.max_windows < 1:
            raise ValueError("max_windows must be >= 1")

    def statistics(self) -> tuple[Statistic, ...]:
        if self.subspace == "ipca":
            return (WindowGrams("paired" if self.inputs == "compressed" else "dense", self.max_windows),)
        return (CompressedPrefixGrams(),) if self.inputs == "compressed" else ()

    def factorize(self, weight: Tensor, stats: LinearStats, rank: int) -> Factorization:
        m, n = weight.shape
        if self.subspace == "ipca":
            grams, tokens = stats.get("gram_windows"), stats.get("window_tokens")
            if grams is None or tokens is None or grams.shape[0] == 0:
                raise ValueError("dobi-ipca needs the per-window Grams (run it through the harness)")
            roots = None
            if m > n:  # the n x n roots are shared by every linear reading this input
                roots = stats.cached("dobi-gram-roots", lambda: [gram_root(h) for h in grams])
            basis = ipca_basis(weight, grams, tokens, rank, center=self.center, roots=roots)
        else:
            gram = stats.gram_hat if self.inputs == "compressed" else stats.gram
            if gram is None:
                raise ValueError("dobi-ipca (covariance, compressed inputs) needs the compressed-prefix Grams")
            basis = covariance_basis(weight, gram, rank)
        a, b, s = project_factors(weight, basis)
        return Factorization(a, b, spectrum=s, info={"storage_params": remap_params(m, n, rank)})


register_method("dobi-svd", "dobi-gamma", "dobi-ipca")
