"""Zero-shot accuracy of an in-memory (possibly SVD-compressed) causal LM through lm-eval.

The model OBJECT and its tokenizer OBJECT are wrapped in lm-eval's ``HFLM`` (its documented
"pre-initialised model" path), so nothing is reloaded from disk or the hub. Tasks are either lm-eval's
registered hub tasks or svdbench's offline mirrors over the data pack (see :mod:`harness.evaluations.zeroshot_tasks`
for the naming rule and ``harness/evaluations/tasks/`` for the YAMLs).

Reported metric per task (``metric``/``value`` in the record): ``acc_norm`` where the task defines it,
otherwise ``acc``. So piqa, openbookqa, arc_*, hellaswag(_approx) and mathqa report acc_norm, and
boolq and winogrande report acc. ``average`` is the unweighted mean of ``value`` over the task set.
Both acc and acc_norm (with stderr) are always stored, because papers differ in which one they quote.

``lm_eval`` (and ``datasets``/``accelerate``, which it needs) is imported lazily, inside the functions,
so the rest of the harness works on images that do not ship it.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.evaluations.registry import EvalSettings, Evaluation, MetricSpec, register_evaluation
from harness.evaluations.zeroshot_tasks import (
    DATA_DIR_KEY,
    TASKS_DIR,
    TaskPlan,
    choose_mode,
    resolve_data_dir,
    resolve_tasks,
)

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

PIP_INSTALL = 'pip install "lm-eval[hf]>=0.4.8" datasets'
METRIC_RULE = "acc_norm where the task defines it, else acc"
RAW_KEYS = (
    "results",
    "groups",
    "group_subtasks",
    "configs",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
    "config",
    "date",
)
"""Top-level keys of lm-eval's result dict kept under ``raw`` (samples and env dumps are dropped)."""


class ZeroShotDependencyError(ImportError):
    """Raised when lm-eval or one of the packages it imports is not installed."""


def _import_lm_eval() -> Any:
    """Import lm_eval and the submodules used here, or fail with an actionable message."""
    try:
        import lm_eval
        import lm_eval.models.huggingface  # noqa: F401  (needs accelerate: the [hf] extra)
        import lm_eval.tasks  # noqa: F401
    except ImportError as err:
        missing = err.name or "lm_eval"
        raise ZeroShotDependencyError(
            f"Zero-shot evaluation needs the package 'lm_eval' (lm-evaluation-harness) and its "
            f"dependencies, but importing it failed: missing module {missing!r} ({err}). "
            f"Install with: {PIP_INSTALL}"
        ) from err
    return lm_eval


def lm_eval_version() -> str:
    """Installed lm-eval version.

    Returns:
        The version string, e.g. ``"0.4.13"``.

    Raises:
        ZeroShotDependencyError: If lm-eval cannot be imported.
    """
    from importlib.metadata import PackageNotFoundError, version

    lm_eval = _import_lm_eval()
    try:
        return version("lm_eval")
    except PackageNotFoundError:
        return str(getattr(lm_eval, "__version__", "unknown"))


@dataclass(frozen=True)
class DocSubset:
    """A named, deterministic subset of each task's documents (a protocol, never a smoke run).

    Exactly one of:

    * ``every=k``: documents ``0, k, 2k, ...`` of each task (id suffix ``:every{k}``);
    * ``docs=n``: ``n`` documents per task, evenly spread over the task's document order,
      ``floor(i * total / n)`` for ``i = 0 .. n-1`` (id suffix ``:docs{n}``); every task then
      weighs equally in the standard error of the average. A task with at most ``n`` documents
      is scored whole.

    Both depend only on each task's document order (its source file's), so every method and every
    process scores the same documents, and both spread over the whole file, unlike lm-eval's
    ``--limit`` (the first N documents, which some source files sort by topic or length).
    """

    every: int | None = None
    docs: int | None = None

    def __post_init__(self) -> None:
        for name in ("every", "docs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"zeroshot.{name} must be a positive integer, got {value!r}")
        if self.every is not None and self.docs is not None:
            raise ValueError("zeroshot.every and zeroshot.docs are two subset rules; set one of them")

    @property
    def active(self) -> bool:
        return self.every is not None or self.docs is not None

    def suffix(self) -> str:
        """The protocol id suffix (``":every4"``, ``":docs200"``; empty for whole tasks)."""
        if self.every is not None:
            return f":every{self.every}"
        return f":docs{self.docs}" if self.docs is not None else ""

    def record(self) -> dict[str, int] | None:
        """What the record stores under ``subset``."""
        if self.every is not None:
            return {"every": self.every}
        return {"docs": self.docs} if self.docs is not None else None

    def doc_ids(self, n_docs: int) -> list[int]:
        """The document indices of a task with ``n_docs`` documents, ascending."""
        if self.every is not None:
            return list(range(0, n_docs, self.every))
        if self.docs is not None and self.docs < n_docs:
            return [i * n_docs // self.docs for i in range(self.docs)]
        return list(range(n_docs))


def subset_of(options: Mapping[str, Any]) -> DocSubset:
    """The :class:`DocSubset` that a run's ``zeroshot`` options name (validated)."""
    return DocSubset(options.get("every"), options.get("docs"))


def protocol_id(version: str | None = None, subset: DocSubset | None = None) -> str:
    """Protocol id stored in every record, e.g. ``"zeroshot@lm-eval-0.4.13"``.

    A document subset is part of the protocol, exactly as a perplexity window subset is
    (``wikitext2@1024:every48``): ``"zeroshot@lm-eval-0.4.13:docs200"``, and reports never put it in
    one column with the full tasks.

    Args:
        version: lm-eval version; the installed one if None.
        subset: The document subset; None or inactive for whole tasks.

    Returns:
        The protocol id.
    """
    return f"zeroshot@lm-eval-{version or lm_eval_version()}" + (subset.suffix() if subset is not None else "")


def _structure(model: torch.nn.Module) -> tuple[dict[str, str], dict[str, int]]:
    # Module types and parameter identities: enough to see a factorised module replaced or a
    # parameter grafted onto it, without copying any weights.
    types = {name: type(mod).__qualname__ for name, mod in model.named_modules()}
    params = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}
    return types, params


@contextmanager
def _structure_preserved(model: torch.nn.Module) -> Iterator[None]:
    """Run HFLM's constructor without letting ``tie_weights()`` touch the model.

    HFLM calls ``model.eval()`` and ``model.tie_weights()``. Tying is meant for freshly loaded
    checkpoints; our model is already final, and with ``tie_word_embeddings`` a factorised
    ``lm_head`` would get the embedding grafted on as an extra ``weight`` parameter (seen with
    transformers 5.x). So ``tie_weights`` is shadowed by a no-op on the instance for the duration,
    and the module tree and parameter identities are checked to be unchanged afterwards.
    """
    before = _structure(model)
    model.tie_weights = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.tie_weights  # drop the instance shadow; the class method is visible again
    if _structure(model) != before:
        raise RuntimeError("Wrapping the model in lm-eval's HFLM changed its modules or parameters.")


def wrap_model(
    model: Any,
    tokenizer: Any,
    *,
    batch_size: int = 16,
    max_length: int | None = None,
) -> Any:
    """Wrap an in-memory model and tokenizer in lm-eval's ``HFLM`` without altering the model.

    Args:
        model: A ``transformers.PreTrainedModel`` (or look-alike: ``.config``, ``.device``,
            forward returning ``.logits``), possibly with ``nn.Linear`` layers factorised.
        tokenizer: The tokenizer OBJECT (never a name: HFLM would then fetch one from the hub).
        batch_size: Requests per forward pass.
        max_length: Context length cap; None lets HFLM derive it from the model config.

    Returns:
        The ``HFLM`` instance.

    Raises:
        ZeroShotDependencyError: If lm-eval is not installed.
        TypeError: If ``tokenizer`` is a string or None.
    """
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        raise TypeError("Pass the tokenizer object; a name or None would make HFLM load one itself.")
    _import_lm_eval()
    from lm_eval.models.huggingface import HFLM

    with _structure_preserved(model):
        return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)


def _task_manager(plan: TaskPlan, data_dir: Path | None) -> Any:
    from lm_eval.tasks import TaskManager

    # Indexing lm-eval's ~15k built-in YAMLs takes ~9 s on 2 cores: skip it for local-only runs.
    return TaskManager(
        include_path=str(TASKS_DIR) if plan.needs_local else None,
        include_defaults=plan.needs_hub,
        metadata={DATA_DIR_KEY: str(data_dir)} if data_dir is not None else None,
    )


def evaluate_zeroshot(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] | None = None,
    *,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    seed: int = 0,
    max_length: int | None = None,
    source: str = "auto",
    subset: DocSubset | None = None,
) -> dict[str, Any]:
    """Zero-shot multiple-choice accuracy of an in-memory model with lm-eval.

    Args:
        model: The (possibly compressed) ``PreTrainedModel``; evaluated where it lives (its device).
            Its train/eval mode is restored afterwards.
        tokenizer: Its tokenizer object (BOS behaviour is the tokenizer's own).
        tasks: None for the default set of the chosen source (``offline-default`` locally,
            ``svd-paper`` on the hub), a task-set name, or task names (see
            :mod:`harness.evaluations.zeroshot_tasks`).
        data_dir: Offline data pack; defaults to ``$SVDBENCH_DATA``. Only read for local tasks.
        limit: Evaluate only the first ``limit`` documents of each task (debugging only).
        batch_size: Batch size of the HFLM wrapper.
        seed: Seed for lm-eval's python, numpy, torch and few-shot RNGs.
        max_length: Context length cap for HFLM (left truncation); None = from the model config.
        source: ``"auto"``, ``"hub"`` or ``"local-pack"``; see :func:`choose_mode`.
        subset: Score a named, deterministic subset of each task's documents (:class:`DocSubset`,
            recorded in the protocol id), unlike ``limit``; None for whole tasks.

    Returns:
        A JSON-serialisable dict: ``protocol``, ``lm_eval_version``, ``num_fewshot``, ``limit``,
        ``batch_size``, ``seed``, ``max_length``, ``task_set``, ``source``, ``data_dir``,
        ``metric_rule``, ``subset`` (:meth:`DocSubset.record`), ``tasks`` (canonical name -> acc,
        acc_stderr, acc_norm, acc_norm_stderr, n_docs, n_docs_total, metric, value, source,
        lm_eval_task, version, and ``per_doc``: ``{"doc_ids": [...], "acc": "0110...",
        "acc_norm": "..."}``, one character per scored document, for paired comparisons between
        methods scored on the same documents), ``average``, ``wall_time_s`` and ``raw`` (lm-eval's
        result dict without samples).

    Raises:
        ZeroShotDependencyError: If lm-eval (or datasets/accelerate) is missing.
        ValueError: For bad arguments or tasks unavailable offline.
        FileNotFoundError: If local tasks are needed and no data pack is found.
    """
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive int or None, got {limit!r}")
    subset = subset if subset is not None and subset.active else None
    if limit is not None and subset is not None:
        raise ValueError("limit (a smoke run) and a document subset (a named protocol) exclude each other")
    lm_eval = _import_lm_eval()
    version = lm_eval_version()
    if limit is not None:
        logger.warning("zero-shot limit=%d: partial task sets, for debugging only", limit)
    mode = choose_mode(source, data_dir)
    plan = resolve_tasks(tasks, mode)
    pack = resolve_data_dir(data_dir) if plan.needs_local else None
    logger.info(
        "zero-shot (%s, %s): %s, limit=%s",
        plan.task_set,
        mode,
        [t.lm_eval_name for t in plan.tasks],
        limit,
    )

    was_training = model.training
    start = time.perf_counter()
    manager = _task_manager(plan, pack)
    totals = _doc_counts(lm_eval, plan, manager) if subset is not None else {}
    samples = {name: subset.doc_ids(n) for name, n in totals.items()} if subset is not None else None
    try:
        lm = wrap_model(model, tokenizer, batch_size=batch_size, max_length=max_length)
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=[t.lm_eval_name for t in plan.tasks],
            num_fewshot=0,
            batch_size=batch_size,
            limit=limit,
            samples=samples,
            task_manager=manager,
            log_samples=True,  # per-document correctness, for paired comparisons
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
        resolved_max_length = int(lm.max_length)
    finally:
        model.train(was_training)
    wall = time.perf_counter() - start
    if raw is None:  # only non-zero ranks get None; we never launch distributed
        raise RuntimeError("lm-eval returned no results (not rank 0?)")

    per_task = {t.canonical: _task_summary(raw, t.lm_eval_name, t.source) for t in plan.tasks}
    for t in plan.tasks:
        if t.lm_eval_name in totals:  # lm-eval counts the subset as "original"; keep the task's size
            per_task[t.canonical]["n_docs_total"] = totals[t.lm_eval_name]
    values = [v["value"] for v in per_task.values()]
    sources = {t.source for t in plan.tasks}
    record = {
        "protocol": protocol_id(version, subset),
        "lm_eval_version": version,
        "num_fewshot": 0,
        "limit": limit,
        "subset": subset.record() if subset is not None else None,
        "batch_size": batch_size,
        "seed": seed,
        "max_length": resolved_max_length,
        "task_set": plan.task_set,
        "source": sources.pop() if len(sources) == 1 else "mixed",
        "data_dir": str(pack) if pack is not None else None,
        "metric_rule": METRIC_RULE,
        "tasks": per_task,
        "average": sum(values) / len(values) if None not in values else None,
        "wall_time_s": round(wall, 3),
        "raw": to_jsonable({k: raw[k] for k in RAW_KEYS if k in raw}),
    }
    logger.info("zero-shot average %s over %d tasks in %.1f s", record["average"], len(values), wall)
    return record


def _doc_counts(lm_eval: Any, plan: TaskPlan, manager: Any) -> dict[str, int]:
    """Number of evaluation documents of each task (lm-eval task name -> count)."""
    names = [t.lm_eval_name for t in plan.tasks]
    if hasattr(manager, "load"):  # lm-eval >= 0.4.10: flat task dicts
        loaded = manager.load(names)["tasks"]
    else:
        from lm_eval.tasks import get_task_dict

        loaded = get_task_dict(names, manager)
    counts = {}
    for t in plan.tasks:
        task = loaded.get(t.lm_eval_name)
        if task is None or not hasattr(task, "eval_docs"):
            raise ValueError(f"zero-shot subsets need plain tasks; {t.lm_eval_name!r} is a group or did not load")
        counts[t.lm_eval_name] = len(task.eval_docs)
    return counts


def _per_doc(raw: Mapping[str, Any], name: str) -> dict[str, Any] | None:
    """Per-document correctness of one task from lm-eval's logged samples, in document order."""
    rows = sorted(raw.get("samples", {}).get(name) or [], key=lambda r: int(r["doc_id"]))
    if not rows:
        return None
    out: dict[str, Any] = {"doc_ids": [int(r["doc_id"]) for r in rows]}
    for metric in ("acc", "acc_norm"):
        if all(metric in r for r in rows):
            out[metric] = "".join("1" if float(r[metric]) > 0.5 else "0" for r in rows)
    return out


def _number(value: Any) -> float | None:
    # lm-eval writes "N/A" for undefined stderrs; NaN/inf would break strict JSON.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _task_summary(raw: Mapping[str, Any], name: str, source: str) -> dict[str, Any]:
    res = raw["results"][name]
    acc, acc_norm = _number(res.get("acc,none")), _number(res.get("acc_norm,none"))
    metric = "acc_norm" if "acc_norm,none" in res else "acc"
    n_samples = raw.get("n-samples", {}).get(name, {})
    return {
        "acc": acc,
        "acc_stderr": _number(res.get("acc_stderr,none")),
        "acc_norm": acc_norm,
        "acc_norm_stderr": _number(res.get("acc_norm_stderr,none")),
        "n_docs": n_samples.get("effective"),
        "n_docs_total": n_samples.get("original"),
        "metric": metric,
        "value": acc_norm if metric == "acc_norm" else acc,
        "source": source,
        "lm_eval_task": name,
        "version": to_jsonable(raw.get("versions", {}).get(name)),
        "per_doc": _per_doc(raw, name),
    }


def to_jsonable(obj: Any) -> Any:
    """Recursively convert lm-eval output into plain JSON types.

    dict keys become strings, tuples/sets lists, numpy/torch scalars Python numbers, non-finite floats
    None, and anything else (dtypes, callables, ...) its ``str``.

    Args:
        obj: Any nested structure.

    Returns:
        A structure that ``json.dumps(..., allow_nan=False)`` accepts.
    """
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [to_jsonable(v) for v in obj]
    item = getattr(obj, "item", None)
    if callable(item) and getattr(obj, "ndim", None) == 0:
        return to_jsonable(item())
    return str(obj)


# -- registration ---------------------------------------------------------------------------------
# Tasks in the column order SVD papers use, with their short table labels.
TASK_LABELS: dict[str, str] = {
    "openbookqa": "Openb.",
    "arc_easy": "ARC_e",
    "arc_challenge": "ARC_c",
    "winogrande": "WinoG.",
    "hellaswag": "HellaS.",
    "hellaswag_approx": "HellaS.≈",
    "piqa": "PIQA",
    "mathqa": "MathQA",
    "boolq": "BoolQ",
    "mmlu": "MMLU",
    "lambada_openai": "LAMBADA",
}
#: A task's metric key: ``zeroshot.tasks.<task>.<value|acc|acc_norm>``.
TASK_KEY = re.compile(r"^zeroshot\.tasks\.([^.]+)\.(value|acc|acc_norm)$")


def _task_metric(key: str) -> MetricSpec | None:
    """Spec of a task key not listed in the registry (a new task, or the acc / acc_norm variants)."""
    if m := TASK_KEY.match(key):
        task, which = m.groups()
        label = TASK_LABELS.get(task, task)
        return MetricSpec(key, label if which == "value" else f"{label} ({which})", True, "acc",
                          in_tables=which == "value")
    return None


def _run(model: Any, tokenizer: Any, s: EvalSettings) -> dict[str, Any]:
    try:
        return evaluate_zeroshot(model, tokenizer, s.tasks, limit=s.limit, batch_size=s.batch_size, seed=s.seed,
                                 subset=subset_of(s.options.get("zeroshot", {})))
    except AssertionError as exc:
        # lm-eval asserts when a choice's continuation alone is longer than the model's context
        # (e.g. long PIQA solutions on a 256-position model); it cannot score such documents.
        limit = getattr(model.config, "max_position_embeddings", None)
        raise ValueError(
            f"lm-eval could not score a document of tasks {s.tasks or 'default'}: a continuation is longer "
            f"than the model's context ({limit} positions). Use a model with a longer context or other tasks."
        ) from exc


def _aliases() -> dict[str, str]:
    aliases = {}
    for task in TASK_LABELS:
        key = f"zeroshot.tasks.{task}.value"
        aliases[task] = aliases[f"zeroshot.{task}"] = aliases[f"zeroshot.tasks.{task}"] = key
    return {**aliases, "average": "zeroshot.average", "avg": "zeroshot.average", "zeroshot": "zeroshot.average"}


register_evaluation(Evaluation(
    "zeroshot", _run,
    metrics=(*(MetricSpec(f"zeroshot.tasks.{t}.value", label, True, "acc") for t, label in TASK_LABELS.items()),
             MetricSpec("zeroshot.average", "Average", True, "acc")),
    aliases=_aliases(),
    preflight=lambda: lm_eval_version() and None,  # raises ZeroShotDependencyError naming the missing package
    # A named subset of each task's documents (DocSubset): every=k or docs=n, in the protocol id.
    options={"every": None, "docs": None},
    check_options=subset_of,
    pattern=_task_metric,
    pattern_position=len(TASK_LABELS) - 0.5,  # unlisted tasks after the listed ones, before the average
))
