"""Stale records: numbers that no longer describe what their label says.

A record is *stale* when

1. **its method name now means another configuration**: the config that the installed method
   registry resolves the record's method name to (``methods.parse_method(name).config()``)
   differs from the config stored in the record, e.g. after a default changed. Running the same
   command today would measure something else, so its numbers must not stand under that name; or
2. **it measured other weights than the model's dense reference**: its model content hash (or hub
   revision) differs from the single one of the dense record(s) with the same model name (the
   model was retrained or replaced after the dense run).

Method names the installed registry cannot resolve (a plugin that is not installed, a name from
another version) and records without a stored config are not judged by rule 1: an unknown method
is never called stale. Reports show stale
records as "stale", never as numbers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pandas as pd

from harness.report.store import canonical_config, value_text

__all__ = ["stale_reasons", "current_config"]

logger = logging.getLogger(__name__)


def current_config(method: str) -> dict[str, Any] | None:
    """The full config ``method`` resolves to with the installed registry, or None if it cannot.

    Imported lazily: the registry pulls in torch, which the rest of the report layer never needs.
    """
    try:
        from methods.method import parse_method
    except ImportError as exc:  # a report-only install without the compressors
        logger.info("cannot import the method registry (%s); method configs are not checked", exc)
        return None
    try:
        # JSON round trip: the registry may hold tuples where records hold lists.
        return json.loads(json.dumps(parse_method(method).config()))
    except (KeyError, ValueError, TypeError) as exc:
        logger.info("method %r is not in the installed registry (%s); its config is not checked", method, exc)
        return None


def _config_reasons(frame: pd.DataFrame, resolve: Callable[[str], dict[str, Any] | None]) -> pd.Series:
    known: dict[str, str | None] = {}
    out = pd.Series(None, index=frame.index, dtype=object)
    for idx, method, stored in zip(frame.index, frame["method"], frame["method_config"], strict=True):
        if method is None or method == "dense" or pd.isna(method):
            continue
        if method not in known:
            cfg = resolve(str(method))
            known[method] = None if cfg is None else canonical_config(cfg)
        now = known[method]
        # A record without a stored config has nothing to compare (hand-made or foreign records).
        if now is not None and stored not in (None, "", "{}") and stored != now:
            out[idx] = f"method config differs from what {method!r} resolves to now (its defaults changed since the run)"
    return out


def _weights_reasons(frame: pd.DataFrame) -> pd.Series:
    out = pd.Series(None, index=frame.index, dtype=object)
    weights = [value_text(h) or value_text(r) for h, r in zip(frame["model_hash"], frame["model_revision"], strict=True)]
    weights_s = pd.Series(weights, index=frame.index, dtype=object)
    for model, g in frame.groupby("model", sort=False):
        dense = {weights_s[i] for i in g.index[g["method"] == "dense"] if weights_s[i]}
        if len(dense) != 1:
            if len(dense) > 1:
                logger.warning(
                    "dense records of model %s disagree on the weights (%s); weights are not checked",
                    model, ", ".join(sorted(dense)),
                )
            continue
        (ref,) = dense
        for i in g.index:
            if weights_s[i] and weights_s[i] != ref:
                out[i] = f"measured other weights ({weights_s[i][:19]}) than the dense reference ({ref[:19]})"
    return out


def stale_reasons(
    frame: pd.DataFrame, resolve: Callable[[str], dict[str, Any] | None] = current_config
) -> pd.Series:
    """Why each row of a store frame is stale (module docstring), or None where it is not.

    Args:
        frame: Store frame (:func:`harness.report.store.load_store`), several models allowed.
        resolve: Method name -> its current full config, or None when unknown (tests inject one).

    Returns:
        A Series aligned with ``frame``: a one-line reason, or None.
    """
    if frame.empty:
        return pd.Series(None, index=frame.index, dtype=object)
    config = _config_reasons(frame, resolve)
    weights = _weights_reasons(frame)
    merged = [c if isinstance(c, str) else w if isinstance(w, str) else None for c, w in zip(config, weights, strict=True)]
    return pd.Series(merged, index=frame.index, dtype=object)
