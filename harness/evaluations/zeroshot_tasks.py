"""Zero-shot task names, task sets and the hub-vs-local-pack choice (no lm_eval import here).

Naming rule (used in every result record):

* Results are keyed by the **canonical** task name: the lm-eval hub name (``piqa``, ``boolq``,
  ``winogrande``, ``openbookqa``, ``arc_easy``, ...). Each task entry carries ``source``: ``"hub"``
  when lm-eval's own registered task ran, ``"local-pack"`` when our offline mirror ran, and
  ``lm_eval_task``: the name lm-eval actually ran.
* Offline mirrors are registered with lm-eval under distinct names, ``<canonical>_local``
  (``piqa_local``, ``boolq_local``, ``winogrande_local``, ``openbookqa_local``), so they can never be
  confused with, or shadow, the built-ins. They reproduce the built-in prompt, choices, target and
  metrics exactly (checked in tests/test_zeroshot_configs.py), hence the canonical key.
* ``hellaswag_approx`` is only an approximation of lm-eval's ``hellaswag`` (different text cleaning in
  the pack's source file). Its canonical name is ``hellaswag_approx`` too; it is never keyed as
  ``hellaswag``, and asking for ``hellaswag`` offline is an error.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
"""Folder with the local task YAMLs, passed to ``TaskManager(include_path=...)``."""

DATA_ENV = "SVDBENCH_DATA"
DATA_DIR_KEY = "svdbench_data_dir"
"""lm-eval task-metadata key through which the pack directory reaches tasks/utils.py loaders."""

SOURCE_HUB = "hub"
SOURCE_LOCAL = "local-pack"

LOCAL_TASKS: dict[str, str] = {
    "piqa": "piqa_local",
    "boolq": "boolq_local",
    "winogrande": "winogrande_local",
    "openbookqa": "openbookqa_local",
    "hellaswag_approx": "hellaswag_approx",
}
"""Canonical name -> lm-eval task name of its local-pack definition."""

HUB_TASKS: tuple[str, ...] = (
    "arc_easy",
    "arc_challenge",
    "piqa",
    "hellaswag",
    "winogrande",
    "openbookqa",
    "mathqa",
    "boolq",
)
"""lm-eval registry names this project uses online (any other registered name also passes through)."""

TASK_SETS: dict[str, tuple[str, ...]] = {
    # What the data pack supports offline; the default whenever the hub is not used.
    "offline-default": ("piqa", "boolq", "winogrande", "openbookqa", "hellaswag_approx"),
    # The seven zero-shot columns of SVD-LLM/ASVD/AdaSVD tables; the default online.
    "svd-paper": ("openbookqa", "arc_easy", "arc_challenge", "winogrande", "hellaswag", "piqa", "mathqa"),
    # The offline set's tasks with their exact hub counterparts (hellaswag instead of the approximation).
    "hub-default": ("piqa", "boolq", "winogrande", "openbookqa", "hellaswag"),
}
DEFAULT_TASK_SET = {SOURCE_LOCAL: "offline-default", SOURCE_HUB: "svd-paper"}

CHANCE_ACCURACY: dict[str, float] = {
    "piqa": 1 / 2, "boolq": 1 / 2, "winogrande": 1 / 2,
    "openbookqa": 1 / 4, "hellaswag": 1 / 4, "hellaswag_approx": 1 / 4,
}
"""Accuracy of a uniform random guess for tasks with a fixed number of choices (ARC and MathQA vary)."""


def chance_average(tasks: Sequence[str]) -> float | None:
    """The unweighted mean of the tasks' chance accuracies (the average column's floor), or None when a
    task's number of choices is not fixed."""
    if not tasks or any(t not in CHANCE_ACCURACY for t in tasks):
        return None
    return sum(CHANCE_ACCURACY[t] for t in tasks) / len(tasks)

_TRUE = {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class ResolvedTask:
    """One task to run: record key, lm-eval task name and where its definition comes from."""

    canonical: str
    lm_eval_name: str
    source: str


@dataclass(frozen=True)
class TaskPlan:
    """The resolved task list of one zero-shot run."""

    task_set: str
    mode: str
    tasks: tuple[ResolvedTask, ...]

    @property
    def needs_local(self) -> bool:
        """Whether any task runs from the local data pack."""
        return any(t.source == SOURCE_LOCAL for t in self.tasks)

    @property
    def needs_hub(self) -> bool:
        """Whether any task comes from lm-eval's built-in registry."""
        return any(t.source == SOURCE_HUB for t in self.tasks)


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the offline data-pack directory: ``data_dir`` if given, else ``$SVDBENCH_DATA``.

    Args:
        data_dir: Explicit pack directory, or None to use the environment variable.

    Returns:
        The existing pack directory, made absolute.

    Raises:
        FileNotFoundError: If no directory is configured or it does not exist.
    """
    raw = data_dir if data_dir is not None else os.environ.get(DATA_ENV)
    if not raw:
        raise FileNotFoundError(
            f"Local zero-shot tasks need the offline data pack: pass data_dir or set ${DATA_ENV}."
        )
    path = Path(raw).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"Data pack directory {path} does not exist.")
    return path


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in _TRUE


def hub_reachable(host: str = "huggingface.co", port: int = 443, timeout: float = 2.0) -> bool:
    """Cheap network probe: can a TCP connection to the HF hub be opened?

    Args:
        host: Host to probe.
        port: TCP port.
        timeout: Seconds before giving up.

    Returns:
        True if the connection succeeded.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def choose_mode(source: str = "auto", data_dir: str | os.PathLike[str] | None = None) -> str:
    """Decide whether hub task names or the local pack are used.

    ``auto`` means: local pack if ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE`` is set; otherwise hub if it
    is reachable; otherwise local pack (which then needs ``data_dir`` or ``$SVDBENCH_DATA``).

    Args:
        source: ``"auto"``, ``"hub"`` or ``"local-pack"`` (``"local"`` is accepted too).
        data_dir: Data-pack directory, only used to explain the decision in the log.

    Returns:
        ``"hub"`` or ``"local-pack"``.

    Raises:
        ValueError: For an unknown ``source``.
    """
    if source in (SOURCE_HUB, SOURCE_LOCAL):
        return source
    if source == "local":
        return SOURCE_LOCAL
    if source != "auto":
        raise ValueError(f"source must be 'auto', 'hub' or 'local-pack', got {source!r}")
    if _env_true("HF_HUB_OFFLINE") or _env_true("HF_DATASETS_OFFLINE"):
        logger.info("HF offline mode is set: using local-pack zero-shot tasks")
        return SOURCE_LOCAL
    if hub_reachable():
        return SOURCE_HUB
    pack = data_dir or os.environ.get(DATA_ENV)
    logger.warning("HF hub unreachable: using local-pack zero-shot tasks (data pack: %s)", pack)
    return SOURCE_LOCAL


def _resolve_one(name: str, mode: str) -> ResolvedTask:
    # Explicit local names always run locally, whatever the mode.
    for canonical, local in LOCAL_TASKS.items():
        if name == local:
            return ResolvedTask(canonical, local, SOURCE_LOCAL)
    if mode == SOURCE_HUB:
        return ResolvedTask(name, name, SOURCE_HUB)
    if name in LOCAL_TASKS:
        return ResolvedTask(name, LOCAL_TASKS[name], SOURCE_LOCAL)
    if name == "hellaswag":
        raise ValueError(
            "lm-eval's exact 'hellaswag' needs the hub dataset; offline only the approximation "
            "'hellaswag_approx' exists (it is reported under that name, never as 'hellaswag')."
        )
    raise ValueError(
        f"Task {name!r} has no local-pack definition; offline tasks are {sorted(LOCAL_TASKS)} "
        f"(or their lm-eval names {sorted(LOCAL_TASKS.values())})."
    )


def resolve_tasks(tasks: Sequence[str] | str | None, mode: str) -> TaskPlan:
    """Turn the user's task request into a :class:`TaskPlan`.

    Args:
        tasks: None for the mode's default set, a task-set name (a ``str`` from :data:`TASK_SETS`),
            or a sequence of task names (canonical, ``*_local`` or any lm-eval registry name).
        mode: ``"hub"`` or ``"local-pack"`` (see :func:`choose_mode`).

    Returns:
        The plan, with ``task_set`` = the set's name, or ``"custom"`` for an explicit list.

    Raises:
        ValueError: For an empty list, a task unavailable offline, or two names with one canonical key.
    """
    if tasks is None:
        set_name = DEFAULT_TASK_SET[mode]
        names: Sequence[str] = TASK_SETS[set_name]
    elif isinstance(tasks, str):
        set_name = tasks if tasks in TASK_SETS else "custom"
        names = TASK_SETS.get(tasks, (tasks,))
    else:
        names = list(tasks)
        set_name = next((k for k, v in TASK_SETS.items() if tuple(names) == v), "custom")
    if not names:
        raise ValueError("No zero-shot tasks requested.")
    resolved = tuple(_resolve_one(n, mode) for n in names)
    keys = [t.canonical for t in resolved]
    if len(set(keys)) != len(keys):
        raise ValueError(f"Tasks {list(names)} map to duplicate record keys {keys}.")
    return TaskPlan(task_set=set_name, mode=mode, tasks=resolved)
