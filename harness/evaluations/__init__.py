"""Evaluations: one registered :class:`Evaluation` object each (:mod:`harness.evaluations.registry`).

Built in, in the column order of SVD papers' tables: perplexity protocols (``wikitext2``, ``ptb``,
``c4``; :mod:`.perplexity`), zero-shot accuracy through lm-eval (``zeroshot``; :mod:`.zeroshot`),
embedding fidelity of encoders (``embed-fidelity``; :mod:`.embedding`) and the compressed model's
speed and bytes (``efficiency``; :mod:`.efficiency`). Importing this package registers them.
Evaluations never import the run engine's sweeps or the reports; they run on a model they are given.
"""

from harness.evaluations.registry import (
    EVALUATIONS,
    EvalSettings,
    Evaluation,
    MetricSpec,
    compute_references,
    evaluation_of_key,
    preflight,
    register_evaluation,
    resolve_options,
    run_evaluations,
)

# isort: off
# Importing registers them; the order is the column order of reports (perplexities, zero-shot,
# embeddings, efficiency), so it must not be sorted.
from harness.evaluations import perplexity  # noqa: F401
from harness.evaluations import zeroshot  # noqa: F401
from harness.evaluations import embedding  # noqa: F401
from harness.evaluations import efficiency  # noqa: F401
# isort: on

__all__ = [
    "EVALUATIONS",
    "EvalSettings",
    "Evaluation",
    "MetricSpec",
    "compute_references",
    "evaluation_of_key",
    "preflight",
    "register_evaluation",
    "resolve_options",
    "run_evaluations",
]
