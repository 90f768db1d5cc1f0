"""What an entry is, shared by every report: identity, labels, method order, model and --limit checks.

An entry is one (model, method + config, ratio, calibration, limit) point of a sweep (one row of a
table); its records of different seeds (the sweep's cells) are replicates, summarised as mean and
spread (:mod:`harness.report.spread`) in tables and figures; :mod:`compare` matches cells, seed by
seed.

Smoke records are of two kinds: lm-eval ``--limit`` runs (``limited``; leaderboards refuse them
unless allowed, marked †) and perplexities scored on the first N windows only
(``--eval-max-windows``, protocol id ``...:firstN``; ``partial_windows``, marked §). Text tables
mark the second kind (their protocol already keeps them out of full-protocol columns); the HTML
site leaves out both unless asked.

A method string with options (``asvd[asvd-sensitivity.n_sequences=1,asvd-sensitivity.step=0.2]``)
is shown as its method's paper name with a numbered footnote mark (``ASVD¹``); the full string goes
into a note under the table (:func:`method_footnotes`). Tables and figures number the same way.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterable

import pandas as pd

from harness.report.store import value_text as _text

__all__ = [
    "LimitedRecordsError",
    "METHOD_ORDER",
    "LIMITED_MARK",
    "PARTIAL_MARK",
    "smoke_mask",
    "method_sort_key",
    "method_display_name",
    "method_footnotes",
    "superscript",
    "select_model",
    "check_limited",
    "protocol_columns",
    "entry_identity",
    "entry_labels",
]

logger = logging.getLogger(__name__)

#: Chronological order used by the papers; the proposed/newer methods come last.
METHOD_ORDER: tuple[str, ...] = (
    "svd", "fwsvd", "asvd", "svd-llm", "basis-sharing", "svd-llm-v2", "adasvd", "ressvd", "duo-svd",
)
_DISPLAY = {
    "dense": "Original",
    "svd": "SVD",
    "fwsvd": "FWSVD",
    "asvd": "ASVD",
    "svd-llm": "SVD-LLM",
    "basis-sharing": "Basis Sharing",
    "svd-llm-v2": "SVD-LLM V2",
    "adasvd": "AdaSVD",
    "ressvd": "ResSVD",
    "duo-svd": "Duo-SVD",
}
LIMITED_MARK = "†"
PARTIAL_MARK = "§"


class LimitedRecordsError(ValueError):
    """Raised when a report would include records evaluated with ``--limit``."""


def _base(name: str) -> str:
    """The method string without its options: ``asvd[a.b=1]`` -> ``asvd``."""
    return name.partition("[")[0]


def method_sort_key(name: str) -> tuple[int, str, int, str]:
    """Stable method order: dense, the known methods, other methods alphabetically.

    A variant (``"svd-llm+adacomp"``) sorts right after its parent (the part before ``+``), and a
    method with options (``"asvd[...]"``) right after the same method without.
    """
    parent, _, variant = _base(name).partition("+")
    if parent == "dense":
        return (-1, "", 0, name)
    rank = METHOD_ORDER.index(parent) if parent in METHOD_ORDER else len(METHOD_ORDER)
    return (rank, parent, 1 if variant else 0, name)


def method_display_name(name: str) -> str:
    """Paper spelling of a method name without its options (``svd-llm+adacomp`` -> ``SVD-LLM+adacomp``,
    ``asvd[...]`` -> ``ASVD``; :func:`method_footnotes` tells such methods apart)."""
    parent, sep, variant = _base(name).partition("+")
    return _DISPLAY.get(parent, parent) + sep + variant


_SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


def superscript(n: int) -> str:
    """``12`` -> ``¹²``: a footnote mark that survives plain-text formats."""
    return str(n).translate(_SUPERSCRIPT)


def method_footnotes(methods: Iterable[str]) -> dict[str, int]:
    """Footnote number of every method string with options, numbered 1, 2, ... in method order.

    Numbers depend only on the set of method strings, so a model's table and figures agree.
    """
    with_options = sorted({m for m in methods if isinstance(m, str) and _base(m) != m}, key=method_sort_key)
    return {m: i for i, m in enumerate(with_options, start=1)}


def select_model(frame: pd.DataFrame, model: str | None) -> list[tuple[str, pd.DataFrame]]:
    """Split the frame per model, or pick one model by name or id.

    Raises:
        ValueError: If ``model`` matches nothing (with close matches) or the frame is empty.
    """
    if frame.empty:
        raise ValueError("the store has no usable records (all failed, or the directory is empty)")
    if model is None:
        return [(str(m), g) for m, g in frame.groupby("model", sort=True)]
    sel = frame[(frame["model"] == model) | (frame["model_id"] == model)]
    if sel.empty:
        names = sorted(
            {str(x) for x in frame["model"].dropna()} | {str(x) for x in frame["model_id"].dropna()}
        )
        close = difflib.get_close_matches(model, names, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"no records for model {model!r}.{hint} Models in the store: {', '.join(names)}")
    return [(str(sel["model"].iloc[0]), sel)]


def check_limited(frame: pd.DataFrame, allow_limited: bool, what: str = "a leaderboard") -> None:
    """Refuse frames that contain ``--limit`` smoke-run records unless explicitly allowed.

    Raises:
        LimitedRecordsError: Listing the offending files.
    """
    limited = frame[frame["limited"].fillna(False).astype(bool)] if "limited" in frame else frame.iloc[:0]
    if limited.empty or allow_limited:
        return
    names = [str(s or k) for s, k in zip(limited["source_file"], limited["run_key"], strict=True)]
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    raise LimitedRecordsError(
        f"refusing to build {what} from {len(names)} record(s) evaluated with lm-eval --limit "
        f"(smoke runs; their numbers are not comparable with full evaluations): {shown}. "
        "Re-run them without --limit, remove them from the results directory, or pass "
        "allow_limited=True (--allow-limited) to include them marked with '†'."
    )


def smoke_mask(frame: pd.DataFrame) -> pd.Series:
    """Rows that are smoke runs: lm-eval ``--limit`` or first-N-window perplexities."""
    out = pd.Series(False, index=frame.index)
    for col in ("limited", "partial_windows"):
        if col in frame:
            out |= frame[col].fillna(False).astype(bool)
    return out


def protocol_columns(key: str) -> list[str]:
    """Frame columns that must agree for values of metric ``key`` to be comparable."""
    group = key.split(".", 1)[0]
    cols = [f"{group}.protocol"]
    if key == "zeroshot.average":
        cols.append("zeroshot.task_set")
    if m := re.match(r"^zeroshot\.tasks\.([^.]+)\.value$", key):
        cols.append(f"zeroshot.tasks.{m.group(1)}.metric")  # acc vs acc_norm differ by points
    return cols


def entry_identity(frame: pd.DataFrame) -> pd.Series:
    """Entry identity without ratio and seed (method, config, calibration, limit); seeds are replicates."""
    parts = ["method", "method_config", "calib_source", "calib_samples", "calib_seqlen", "limit"]
    keys = ["|".join(_text(v) for v in row) for row in frame[parts].itertuples(index=False)]
    return pd.Series(keys, index=frame.index, dtype=object)


def entry_labels(frame: pd.DataFrame) -> pd.Series:
    """Method labels: the display name, a footnote mark for a method string with options
    (:func:`method_footnotes`), and what tells entries apart when one method name covers several
    configs/calibrations.

    ``frame`` must carry an ``_identity`` column from :func:`entry_identity`.
    """
    notes = method_footnotes(frame["method"])
    labels = frame["method"].map(lambda m: method_display_name(m) + (superscript(notes[m]) if m in notes else ""))
    calib_cols = ["calib_source", "calib_samples", "calib_seqlen"]
    for method, g in frame.groupby("method", sort=False):
        if g["_identity"].nunique() <= 1:
            continue
        many_configs = g["method_config"].nunique() > 1
        many_calibs = len({tuple(map(_text, c)) for c in g[calib_cols].itertuples(index=False)}) > 1
        many_limits = len({_text(v) for v in g["limit"]}) > 1
        if many_configs or many_calibs:
            # Not an error (ablations do this on purpose), but the reader must see the rows differ.
            logger.warning(
                "method %r appears with several configurations/calibrations; labelling them apart", method
            )
        for idx, r in g.iterrows():
            bits = []
            if many_configs:
                bits.append(f"cfg {r['config_hash']}")
            if many_calibs:
                src = _text(r["calib_source"]).rsplit("/", 1)[-1]
                bits.append(f"calib {_text(r['calib_samples'])}×{_text(r['calib_seqlen'])} {src}".strip())
            if many_limits and pd.notna(r["limit"]):
                bits.append(f"limit {_text(r['limit'])}")
            if bits:
                labels[idx] = f"{labels[idx]} ({', '.join(bits)})"
    return labels
