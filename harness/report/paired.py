"""The paired tie rule of zero-shot columns: a difference must stand out over documents and over seeds.

Every method is scored on the same documents of each task, so two entries are compared document by
document, which removes the documents' own difficulty from the noise (a paired test). The rule,
for one zero-shot column (a task's accuracy, or the average over tasks) and one entry against the
best entry of its ratio group:

* per document ``i``, the entry's correctness ``a_i`` (0 or 1 in the column's metric, ``acc`` or
  ``acc_norm``) is averaged over its seeds; ``d_i = a_i − b_i`` against the best entry ``b``;
* a task's difference is ``mean d_i`` with paired standard error ``SE = sd(d_i) / sqrt(n)``
  (``n`` documents, ``n − 1`` in the ``sd``);
* the average column's difference is the mean of the ``T`` task differences, with
  ``SE = sqrt(Σ SE_t²) / T``;
* the two entries are **separated** only when ``|difference| > 1.96 · SE`` (paired, over documents)
  **and** the seed-spread rule (:mod:`harness.report.spread`) separates them too; otherwise they tie.

Records without per-document data (written before it was stored) leave the seed-spread rule alone
to decide, and the table says so. Data are "missing" for an entry unless every record behind its
value carries them, for every task of the column, on the same documents as the other entry.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from harness.evaluations.zeroshot import TASK_KEY

__all__ = [
    "Z",
    "PAIRED_TIE_DEFINITION",
    "PAIRED_FALLBACK_NOTE",
    "ColumnDocs",
    "DocScores",
    "PairedDifference",
    "is_paired_column",
    "column_tasks",
    "decode_per_doc",
    "entry_docs",
    "paired_difference",
    "paired_test",
]

Z = 1.96  # two-sided 95% normal quantile
PAIRED_TIE_DEFINITION = (
    "zero-shot columns: paired over documents (every method answers the same documents): per document, "
    "correctness averaged over seeds, d_i = a_i − a_best,i; task difference = mean d_i, SE = sd(d_i)/√n; "
    "Average: mean of the task differences, SE = √(Σ SE_t²)/T; an entry is separated from the best only "
    f"when |difference| > {Z}·SE and the seed rule separates it too, otherwise it ties"
)
PAIRED_FALLBACK_NOTE = (
    "records without per-document data (written before it was stored), so the paired rule cannot "
    "apply there: the seed rule alone decides"
)

#: Document-level columns of one entry and column: task prefix (``zeroshot.tasks.piqa``) -> scores.
ColumnDocs = dict[str, "DocScores"]


@dataclass(frozen=True, eq=False)
class DocScores:
    """One entry's correctness on one task's documents.

    Attributes:
        doc_ids: Document ids, ascending.
        correct: Correctness per document in ``doc_ids`` order, averaged over seeds (in [0, 1]).
    """

    doc_ids: tuple[int, ...]
    correct: np.ndarray


@dataclass(frozen=True)
class PairedDifference:
    """``mean d_i`` of an entry against another, with its paired standard error.

    Attributes:
        diff: Difference in the metric's raw units (fractions, not %).
        se: Its standard error (inf when there is a single document: no spread to judge by).
        n: Documents compared (all tasks together).
    """

    diff: float
    se: float
    n: int

    @property
    def separated(self) -> bool:
        """Whether the difference exceeds 1.96 standard errors (the paired half of the rule)."""
        return abs(self.diff) > Z * self.se


def is_paired_column(key: str) -> bool:
    """Whether the paired rule applies to a column: a zero-shot task's accuracy or the average."""
    return key == "zeroshot.average" or TASK_KEY.match(key) is not None


def column_tasks(key: str, row: Mapping[str, Any]) -> list[tuple[str, str]] | None:
    """(task prefix, correctness metric) pairs behind a zero-shot column of one record, or None.

    ``zeroshot.tasks.<t>.value`` uses the record's ``metric`` of the task; ``.acc``/``.acc_norm``
    name theirs; ``zeroshot.average`` is every task of the record with a value. Other columns
    (perplexities, embeddings) are no zero-shot accuracy: None.
    """
    if m := TASK_KEY.match(key):
        task, which = m.groups()
        metric = row.get(f"zeroshot.tasks.{task}.metric") if which == "value" else which
        return [(f"zeroshot.tasks.{task}", str(metric))] if isinstance(metric, str) else []
    if key == "zeroshot.average":
        parts = []
        for col, value in row.items():
            m = TASK_KEY.match(str(col))
            if m and m.group(2) == "value" and value is not None and not _isnan(value):
                parts += column_tasks(str(col), row) or []
        return sorted(parts)
    return None


def _isnan(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def decode_per_doc(block: Mapping[str, Any] | None, metric: str) -> DocScores | None:
    """One record's ``per_doc`` block of one task as scores in document order, or None when absent.

    Raises:
        ValueError: When the block is malformed (string length differs from the document count, or
            characters other than '0'/'1'), so that a corrupt record cannot decide a tie silently.
    """
    if not block or not isinstance(block.get(metric), str) or block.get("doc_ids") is None:
        return None
    ids, bits = [int(i) for i in block["doc_ids"]], block[metric]
    if len(bits) != len(ids) or set(bits) - {"0", "1"}:
        raise ValueError(
            f"per_doc {metric!r}: expected one '0'/'1' per document ({len(ids)} doc_ids), got {len(bits)} "
            f"characters{' including others' if set(bits) - {'0', '1'} else ''}"
        )
    order = np.argsort(ids, kind="stable")
    correct = np.frombuffer(bits.encode("ascii"), dtype=np.uint8)[order].astype(float) - ord("0")
    return DocScores(tuple(int(ids[i]) for i in order), correct)


def _mean_scores(scores: Sequence[DocScores]) -> DocScores | None:
    """Per-document mean of several runs on the same documents; None when their documents differ."""
    if not scores or any(s.doc_ids != scores[0].doc_ids for s in scores):
        return None
    return DocScores(scores[0].doc_ids, np.mean([s.correct for s in scores], axis=0))


def entry_docs(key: str, records: Sequence[tuple[str, Mapping[str, Any]]]) -> ColumnDocs | None:
    """An entry's per-document correctness for one zero-shot column, averaged over its seeds.

    Re-runs of one seed are averaged first (as the values are), then the seeds.

    Args:
        key: The column's metric key.
        records: ``(seed, frame row)`` of every record that gives the entry its value in ``key``;
            each row carries the store's ``per_doc`` column.

    Returns:
        Task prefix -> scores; None when any record lacks the data, the records disagree on the
        tasks or documents, or ``key`` is no zero-shot column.
    """
    by_seed: dict[str, list[dict[str, DocScores]]] = {}
    tasks: list[tuple[str, str]] | None = None
    for seed, row in records:
        parts = column_tasks(key, row)
        if not parts or (tasks is not None and parts != tasks):
            return None
        tasks = parts
        blocks = row.get("per_doc") or {}
        decoded: dict[str, DocScores] = {}
        for prefix, metric in parts:
            scores = decode_per_doc(blocks.get(prefix), metric)
            if scores is None:
                return None
            decoded[prefix] = scores
        by_seed.setdefault(seed, []).append(decoded)
    if tasks is None:
        return None
    out: ColumnDocs = {}
    for prefix, _ in tasks:
        per_seed = [_mean_scores([run[prefix] for run in runs]) for runs in by_seed.values()]
        if any(s is None for s in per_seed):
            return None
        mean = _mean_scores([s for s in per_seed if s is not None])
        if mean is None:
            return None
        out[prefix] = mean
    return out


def _task_difference(a: DocScores, b: DocScores) -> PairedDifference | None:
    if a.doc_ids != b.doc_ids or not a.doc_ids:
        return None  # every method answers the same documents; anything else is not a paired comparison
    d = a.correct - b.correct
    n = len(d)
    se = float(np.std(d, ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    return PairedDifference(float(np.mean(d)), se, n)


def paired_difference(a: ColumnDocs, b: ColumnDocs) -> PairedDifference | None:
    """Entry ``a`` minus entry ``b`` over the column's tasks (module docstring); None without common data.

    One task: its mean difference and paired SE. Several (the average): the mean of the task
    differences, ``SE = sqrt(Σ SE_t²) / T``.
    """
    if not a or set(a) != set(b):
        return None
    parts = [_task_difference(a[t], b[t]) for t in sorted(a)]
    if any(p is None for p in parts):
        return None
    done = [p for p in parts if p is not None]
    t = len(done)
    return PairedDifference(
        sum(p.diff for p in done) / t, math.sqrt(sum(p.se**2 for p in done)) / t, sum(p.n for p in done)
    )


def paired_test(docs: Mapping[Hashable, ColumnDocs | None]) -> Callable[[Hashable, Hashable], bool | None]:
    """The paired half of the zero-shot tie rule for one ratio group and column.

    Args:
        docs: Entry id -> its :func:`entry_docs` (None where the records lack per-document data).

    Returns:
        ``test(entry, best)``: True when the paired test separates the two, False when it ties
        them, None when there is nothing to pair (the seed rule alone decides).
    """

    def test(entry: Hashable, best: Hashable) -> bool | None:
        a, b = docs.get(entry), docs.get(best)
        diff = paired_difference(a, b) if a is not None and b is not None else None
        return None if diff is None else diff.separated

    return test
