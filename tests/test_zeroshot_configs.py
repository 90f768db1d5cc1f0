"""Our offline zero-shot tasks render exactly what lm-eval's OWN built-in task configs render.

For piqa, boolq, winogrande and openbookqa, lm-eval's shipped YAMLs (lm_eval/tasks/...) are loaded
through its TaskManager with the dataset download bypassed: the pack documents, mapped back to the
original hub schema each built-in expects, are injected instead. Every document's prompt
(doc_to_text), choices (doc_to_choice), target (doc_to_target) and the (context, continuation) pairs
that are actually scored must equal those of our local task loaded the normal way. Metrics, output
type and delimiters must match too.

Also here: task-name resolution and the lazy, actionable import error when lm_eval is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.evaluations import zeroshot_tasks as zt

REPO = Path(__file__).resolve().parents[1]
DATA_ENV = os.environ.get("SVDBENCH_DATA")
needs_pack = pytest.mark.skipif(
    not DATA_ENV or not Path(DATA_ENV).is_dir(), reason="SVDBENCH_DATA (offline data pack) not set"
)

# canonical name -> (built-in task dir under lm_eval/tasks, built-in task name, expected doc count)
BUILTINS = {
    "piqa": ("piqa", "piqa", 1838),
    "boolq": ("super_glue/boolq", "boolq", 3270),
    "winogrande": ("winogrande", "winogrande", 1267),
    "openbookqa": ("openbookqa", "openbookqa", 500),
}


# ----------------------------------------------------------------------------- pack -> hub schema
# Written independently of harness/evaluations/tasks/utils.py: straight from the raw pack files.


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _hub_piqa(pack: Path) -> list[dict[str, Any]]:
    labels = (pack / "piqa" / "valid-labels.lst").read_text().split()
    docs = _jsonl(pack / "piqa" / "valid.jsonl")
    return [{**d, "label": int(lab)} for d, lab in zip(docs, labels, strict=True)]


def _hub_boolq(pack: Path) -> list[dict[str, Any]]:
    out = []
    for i, d in enumerate(_jsonl(pack / "llm-foundry-converted" / "boolq.jsonl")):
        assert d["query"].startswith("Passage: ") and d["query"].endswith("?")
        passage, _, question = d["query"][len("Passage: ") : -1].rpartition("\nQuestion: ")
        out.append({"passage": passage, "question": question, "idx": i, "label": d["gold"]})
    return out


def _hub_winogrande(pack: Path) -> list[dict[str, Any]]:
    # Original: sentence with one "_", option1/option2, answer "1"/"2". Any split of the two filled-in
    # contexts into shared prefix + option reproduces them; the continuation follows the blank.
    out = []
    for d in _jsonl(pack / "llm-foundry-converted" / "winogrande.jsonl"):
        a, b = d["context_options"]
        prefix = os.path.commonprefix([a, b])
        assert "_" not in prefix
        out.append(
            {
                "sentence": f"{prefix}_ {d['continuation']}",
                "option1": a[len(prefix) :],
                "option2": b[len(prefix) :],
                "answer": str(d["gold"] + 1),
            }
        )
    return out


def _hub_openbookqa(pack: Path) -> list[dict[str, Any]]:
    out = []
    for i, d in enumerate(_jsonl(pack / "llm-foundry-converted" / "openbook_qa.jsonl")):
        labels = list("ABCD")[: len(d["choices"])]
        out.append(
            {
                "id": str(i),
                "question_stem": d["query"],
                "choices": {"text": d["choices"], "label": labels},
                "answerKey": labels[d["gold"]],
            }
        )
    return out


HUB_DOCS = {
    "piqa": _hub_piqa,
    "boolq": _hub_boolq,
    "winogrande": _hub_winogrande,
    "openbookqa": _hub_openbookqa,
}


# ----------------------------------------------------------------------------- task loading


@pytest.fixture(scope="module")
def tasks() -> Iterator[dict[str, tuple[Any, Any]]]:
    """canonical -> (built-in task over injected docs, our local task over the pack)."""
    pytest.importorskip("lm_eval")
    import datasets
    import lm_eval.tasks
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

    pack = Path(DATA_ENV or "")
    local_tm = TaskManager(
        include_path=str(zt.TASKS_DIR), include_defaults=False, metadata={zt.DATA_DIR_KEY: str(pack)}
    )
    local = local_tm.load([zt.LOCAL_TASKS[c] for c in BUILTINS])["tasks"]

    builtin_root = Path(lm_eval.tasks.__file__).parent
    built: dict[str, Any] = {}
    for canonical, (subdir, name, _) in BUILTINS.items():
        docs = datasets.Dataset.from_list(HUB_DOCS[canonical](pack))

        def fake_download(self: Any, dataset_kwargs: Any = None, _docs: Any = docs, **kwargs: Any) -> None:
            splits = (self.config.training_split, self.config.validation_split, self.config.test_split)
            self.dataset = datasets.DatasetDict({s: _docs for s in splits if s})

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(ConfigurableTask, "download", fake_download)
            tm = TaskManager(include_path=str(builtin_root / subdir), include_defaults=False)
            built[canonical] = tm.load([name])["tasks"][name]
    yield {c: (built[c], local[zt.LOCAL_TASKS[c]]) for c in BUILTINS}


def _render(task: Any, doc: dict[str, Any]) -> dict[str, Any]:
    ctx = task.fewshot_context(doc=doc, num_fewshot=0)
    requests = task.construct_requests(doc=doc, ctx=ctx, metadata=("t", 0, 1))
    return {
        "text": task.doc_to_text(doc),
        "choices": task.doc_to_choice(doc),
        "target": task.doc_to_target(doc),
        "requests": [r.arguments for r in requests],
    }


@needs_pack
@pytest.mark.parametrize("canonical", list(BUILTINS))
def test_local_task_renders_like_builtin(tasks: dict[str, tuple[Any, Any]], canonical: str) -> None:
    builtin, local = tasks[canonical]
    b_docs, l_docs = list(builtin.eval_docs), list(local.eval_docs)
    assert len(l_docs) == len(b_docs) == BUILTINS[canonical][2]
    assert local.multiple_input == builtin.multiple_input
    for i, (bd, ld) in enumerate(zip(b_docs, l_docs, strict=True)):  # every document
        assert _render(local, ld) == _render(builtin, bd), f"{canonical} doc {i} differs"


@needs_pack
@pytest.mark.parametrize("canonical", list(BUILTINS))
def test_local_task_scores_like_builtin(tasks: dict[str, tuple[Any, Any]], canonical: str) -> None:
    builtin, local = tasks[canonical]
    assert local.OUTPUT_TYPE == builtin.OUTPUT_TYPE == "multiple_choice"
    assert local.aggregation() == builtin.aggregation()  # same metrics, same aggregation functions
    assert local.higher_is_better() == builtin.higher_is_better()
    for key in ("target_delimiter", "fewshot_delimiter", "description", "process_results", "filter_list"):
        assert getattr(local.config, key) == getattr(builtin.config, key), key
    assert str(local.VERSION) == str(builtin.VERSION)


# ----------------------------------------------------------------------------- name resolution


def test_resolve_offline_default_set() -> None:
    plan = zt.resolve_tasks(None, zt.SOURCE_LOCAL)
    assert plan.task_set == "offline-default"
    assert [(t.canonical, t.lm_eval_name, t.source) for t in plan.tasks] == [
        ("piqa", "piqa_local", "local-pack"),
        ("boolq", "boolq_local", "local-pack"),
        ("winogrande", "winogrande_local", "local-pack"),
        ("openbookqa", "openbookqa_local", "local-pack"),
        ("hellaswag_approx", "hellaswag_approx", "local-pack"),
    ]


def test_resolve_hub_and_explicit_local_names() -> None:
    plan = zt.resolve_tasks(["arc_easy", "piqa", "hellaswag_approx"], zt.SOURCE_HUB)
    assert plan.task_set == "custom"
    assert [(t.canonical, t.lm_eval_name, t.source) for t in plan.tasks] == [
        ("arc_easy", "arc_easy", "hub"),
        ("piqa", "piqa", "hub"),
        ("hellaswag_approx", "hellaswag_approx", "local-pack"),
    ]
    assert zt.resolve_tasks(None, zt.SOURCE_HUB).task_set == "svd-paper"
    assert zt.resolve_tasks("hub-default", zt.SOURCE_HUB).tasks[-1].canonical == "hellaswag"


def test_resolve_rejects_unavailable_offline_and_duplicates() -> None:
    with pytest.raises(ValueError, match="hellaswag_approx"):
        zt.resolve_tasks(["hellaswag"], zt.SOURCE_LOCAL)  # never silently swapped for the approximation
    with pytest.raises(ValueError, match="no local-pack definition"):
        zt.resolve_tasks(["arc_easy"], zt.SOURCE_LOCAL)
    with pytest.raises(ValueError, match="duplicate"):
        zt.resolve_tasks(["piqa", "piqa_local"], zt.SOURCE_HUB)


def test_choose_mode_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert zt.choose_mode("auto") == zt.SOURCE_LOCAL
    assert zt.choose_mode("hub") == zt.SOURCE_HUB
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setattr(zt, "hub_reachable", lambda *a, **k: False)
    assert zt.choose_mode("auto") == zt.SOURCE_LOCAL


# ----------------------------------------------------------------------------- missing lm_eval


def test_missing_lm_eval_gives_actionable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.evaluations import zeroshot

    # None in sys.modules makes `import lm_eval` raise ImportError, as on an image without it.
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(zeroshot.ZeroShotDependencyError, match=r"lm_eval.*pip install") as info:
        zeroshot.evaluate_zeroshot(object(), object(), ["piqa"])
    assert "lm-eval[hf]" in str(info.value)
    assert isinstance(info.value, ImportError)


def test_harness_imports_without_datasets() -> None:
    # Fresh interpreter with `datasets` absent (lm_eval itself installed): the harness module imports,
    # does not import lm_eval eagerly, and using it names the missing package and the pip command.
    code = (
        "import sys\n"
        "sys.modules['datasets'] = None\n"
        "import harness.evaluations.zeroshot as z, harness.evaluations.zeroshot_tasks\n"
        "assert 'lm_eval' not in sys.modules, 'lm_eval imported eagerly'\n"
        "try:\n"
        "    z.lm_eval_version()\n"
        "except z.ZeroShotDependencyError as e:\n"
        "    print('ERR', e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    assert "ERR" in out.stdout, out.stdout + out.stderr
    assert "'datasets'" in out.stdout and "pip install" in out.stdout, out.stdout
