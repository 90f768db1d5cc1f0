"""Reports from the result-record store: leaderboards, figures and regression verdicts.

Modules:
    store: load records into a flat DataFrame (:func:`load_store`, :func:`records_to_frame`).
    metrics: the metric registry (labels, directions, formats; did-you-mean errors).
    spread: seed replicates as mean ± sample standard deviation, and the best/tie rule.
    paired: the paired tie rule of zero-shot columns (per-document differences against the best).
    staleness: which records no longer describe what their label says (config drift, other weights).
    leaderboard: paper-style tables (:func:`render_leaderboard`; md, LaTeX, CSV).
    site/: the static HTML site (:func:`write_site`; writer, sections, record_page, markup, assets):
        table, filters, figures, record pages.
    plots / style: paper figures (:func:`plot`) with one fixed style per method, error bars from the spread.
    compare: regression verdicts (:func:`compare`) and scenario checks (:func:`check_scenario`).
    agreement: rank agreement of two metrics or two models (:func:`agreement`; Spearman, Kendall).
    cli: ``leaderboard`` (md, latex, csv, html; ``--agreement``) / ``plot`` / ``compare`` subcommands
        for the engine's CLI.

The names below are imported lazily so that ``import harness.report`` does not pull in matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_store": "store",
    "load_stores": "store",
    "records_to_frame": "store",
    "resolve_metric": "metrics",
    "render_leaderboard": "leaderboard",
    "build_leaderboard": "leaderboard",
    "plot": "plots",
    "compare": "compare",
    "check_scenario": "compare",
    "CompareResult": "compare",
    "add_report_subcommands": "cli",
    "write_site": "site.writer",
    "stale_reasons": "staleness",
    "agreement": "agreement",
    "rank_agreement": "agreement",
    "render_agreement": "agreement",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
