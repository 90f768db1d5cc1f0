"""Document loaders and helpers for svdbench's local (offline) lm-eval tasks.

lm-eval loads this file by path (``!function utils.<name>`` in the sibling YAMLs). The YAMLs are only
reachable through the installed harness (its task directory is handed to lm-eval's ``TaskManager``),
so the pack directory is resolved by the one resolver, :func:`harness.evaluations.zeroshot_tasks.resolve_data_dir`.

The YAMLs use ``custom_dataset``: lm-eval calls the loader with the task's ``metadata`` merged with
``dataset_kwargs`` instead of ``datasets.load_dataset``. svdbench passes the data-pack directory as
metadata key ``svdbench_data_dir`` (``TaskManager(metadata=...)``); ``SVDBENCH_DATA`` is the fallback.
This keeps the YAMLs static (no absolute paths baked in) and never writes into the read-only pack.

Each loader returns the documents in the pack's native layout (file order preserved), plus the
merged PIQA label; the YAML templates then render lm-eval's built-in prompts from that layout. The
equivalence with the built-in tasks is checked document by document in tests/test_zeroshot_configs.py.
"""

from __future__ import annotations

import bz2
import json
import re
from pathlib import Path
from typing import Any

import datasets

from harness.evaluations.zeroshot_tasks import DATA_DIR_KEY, resolve_data_dir


def _pack(kwargs: dict[str, Any]) -> Path:
    return resolve_data_dir(kwargs.get(DATA_DIR_KEY))


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _as_split(split: str, docs: list[dict[str, Any]]) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(docs)})


# ----------------------------------------------------------------------------- document readers
# Plain-list readers are shared by the loaders below and by the tests.


def read_piqa(data_dir: Path) -> list[dict[str, Any]]:
    """PIQA dev in its original schema ``{goal, sol1, sol2, label}``.

    The labels live in a separate line-aligned ``valid-labels.lst``; they are merged here, in memory.
    """
    docs = _read_jsonl(data_dir / "piqa" / "valid.jsonl")
    labels = (data_dir / "piqa" / "valid-labels.lst").read_text(encoding="utf-8").split()
    if len(labels) != len(docs):
        raise ValueError(f"PIQA: {len(docs)} documents but {len(labels)} labels")
    return [
        {"goal": d["goal"], "sol1": d["sol1"], "sol2": d["sol2"], "label": int(lab)}
        for d, lab in zip(docs, labels, strict=True)
    ]


def read_foundry(data_dir: Path, name: str) -> list[dict[str, Any]]:
    """One llm-foundry converted file (``boolq``, ``winogrande``, ``openbook_qa``), unchanged."""
    return _read_jsonl(data_dir / "llm-foundry-converted" / f"{name}.jsonl")


def _hellaswag_clean(text: str) -> str:
    # Same steps as lm-eval's hellaswag preprocessing (strip, " [title]" -> ". ", drop bracketed
    # WikiHow tags, collapse double spaces). The pack text was already cleaned by llama.cpp, so this
    # only removes the few brackets left; ctx_b capitalisation cannot be restored (see README).
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def read_hellaswag_approx(data_dir: Path) -> list[dict[str, Any]]:
    """HellaSwag val from llama.cpp's 6-lines-per-item text file (approximate, see data/README.md)."""
    path = data_dir / "hellaswag-approx" / "hellaswag_val_full.txt.bz2"
    with bz2.open(path, mode="rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"HellaSwag approx: {len(lines)} lines is not a multiple of 6")
    return [
        {
            "query": _hellaswag_clean(lines[i]),
            "choices": [_hellaswag_clean(e) for e in lines[i + 2 : i + 6]],
            "gold": int(lines[i + 1]),
        }
        for i in range(0, len(lines), 6)
    ]


# ----------------------------------------------------------------------------- custom_dataset hooks


def load_piqa(**kwargs: Any) -> datasets.DatasetDict:
    """custom_dataset for ``piqa_local``: PIQA dev (1838) as split ``validation``."""
    return _as_split("validation", read_piqa(_pack(kwargs)))


def load_boolq(**kwargs: Any) -> datasets.DatasetDict:
    """custom_dataset for ``boolq_local``: BoolQ dev (3270) as split ``validation``."""
    return _as_split("validation", read_foundry(_pack(kwargs), "boolq"))


def load_winogrande(**kwargs: Any) -> datasets.DatasetDict:
    """custom_dataset for ``winogrande_local``: WinoGrande dev (1267) as split ``validation``."""
    return _as_split("validation", read_foundry(_pack(kwargs), "winogrande"))


def load_openbookqa(**kwargs: Any) -> datasets.DatasetDict:
    """custom_dataset for ``openbookqa_local``: OpenBookQA main test (500) as split ``test``."""
    return _as_split("test", read_foundry(_pack(kwargs), "openbook_qa"))


def load_hellaswag_approx(**kwargs: Any) -> datasets.DatasetDict:
    """custom_dataset for ``hellaswag_approx``: llama.cpp HellaSwag val (10042) as ``validation``."""
    return _as_split("validation", read_hellaswag_approx(_pack(kwargs)))


# ----------------------------------------------------------------------------- prompt helpers

_BOOLQ_PREFIX = "Passage: "


def boolq_doc_to_text(doc: dict[str, Any]) -> str:
    """lm-eval's BoolQ prompt ``"<passage>\\nQuestion: <question>?\\nAnswer:"`` from the foundry query.

    The foundry query is ``"Passage: <passage>\\nQuestion: <question>?"``: dropping the prefix and
    appending ``"\\nAnswer:"`` gives the built-in template's output exactly.
    """
    query: str = doc["query"]
    if not query.startswith(_BOOLQ_PREFIX):
        raise ValueError(f"unexpected BoolQ query layout: {query[:40]!r}")
    return query[len(_BOOLQ_PREFIX) :] + "\nAnswer:"
