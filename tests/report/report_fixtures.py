"""Fixture result store for the report tests (builders; pytest fixtures are in conftest.py): hand-picked numbers for a toy 8-block Llama.

The numbers mimic the shape of the SVD papers' tables (plain SVD blows up to 10^4 perplexity,
whitened methods stay close to dense) and are chosen so that each column's best value belongs
to a different method, which is what the bolding tests need.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from harness.report.staleness import current_config

MODEL = "toy-llama"
N_BLOCKS = 8
HIDDEN, INTER = 256, 688
KINDS = {  # kind -> (out, in), nn.Linear convention
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, HIDDEN),
    "v_proj": (HIDDEN, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (INTER, HIDDEN),
    "up_proj": (INTER, HIDDEN),
    "down_proj": (HIDDEN, INTER),
}
TASK_METRIC = {
    "openbookqa": "acc_norm",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "winogrande": "acc",
    "hellaswag": "acc_norm",
    "piqa": "acc_norm",
}

# (method, ratio, seed) -> (wikitext2 ppl, ptb ppl, task accuracies in TASK_METRIC order)
CELLS: dict[tuple[str, float, int], tuple[float, float, list[float]]] = {
    ("dense", 0.0, 0): (5.68, 10.59, [0.442, 0.7626, 0.4625, 0.6993, 0.7600, 0.7916]),
    ("svd", 0.2, 0): (20061.46, 20306.18, [0.272, 0.2630, 0.2150, 0.4870, 0.2610, 0.5250]),
    ("svd-llm", 0.2, 0): (7.94, 16.22, [0.360, 0.6500, 0.3400, 0.6600, 0.5600, 0.7000]),
    ("adasvd", 0.2, 0): (8.10, 15.80, [0.350, 0.6400, 0.3350, 0.6550, 0.5500, 0.7150]),
    ("ressvd", 0.2, 0): (8.02, 16.50, [0.355, 0.6450, 0.3300, 0.6500, 0.5550, 0.6950]),
    ("svd", 0.4, 0): (39661.03, 45123.77, [0.250, 0.2500, 0.2100, 0.4900, 0.2550, 0.5100]),
    ("svd-llm", 0.4, 0): (13.11, 63.75, [0.300, 0.5200, 0.2600, 0.5900, 0.4000, 0.6300]),
    ("svd-llm", 0.4, 1): (13.31, 64.95, [0.310, 0.5300, 0.2600, 0.5900, 0.4000, 0.6300]),
    ("adasvd", 0.4, 0): (14.76, 58.20, [0.290, 0.5000, 0.2500, 0.5800, 0.3900, 0.6600]),
    ("ressvd", 0.4, 0): (13.50, 61.00, [0.295, 0.5100, 0.2550, 0.5850, 0.3950, 0.6400]),
    ("svd-llm+adacomp", 0.4, 0): (12.90, 66.00, [0.305, 0.5250, 0.2650, 0.5950, 0.4050, 0.6200]),
}
ALLOCATOR = {
    "svd": "uniform",
    "svd-llm": "uniform",
    "adasvd": "adacr",
    "ressvd": "last-layers",
    "svd-llm+adacomp": "uniform",
}


def _keep_profile(method: str, ratio: float) -> list[float]:
    """Per-block keep ratio as each allocator would produce it (average = 1 - ratio)."""
    keep = 1.0 - ratio
    if ALLOCATOR.get(method) == "adacr":  # more rank to early (more important) blocks
        weights = [1.25 - 0.5 * b / (N_BLOCKS - 1) for b in range(N_BLOCKS)]
        return [min(1.0, keep * w) for w in weights]
    if ALLOCATOR.get(method) == "last-layers":  # only the last half is compressed, harder
        half = N_BLOCKS // 2
        return [1.0] * half + [max(0.05, 1.0 - 2 * ratio)] * half
    return [keep] * N_BLOCKS


def _layers(method: str, ratio: float) -> list[dict[str, Any]]:
    out = []
    for block, keep in enumerate(_keep_profile(method, ratio)):
        for kind, (m, n) in KINDS.items():
            rank = math.floor(keep * m * n / (m + n))
            out.append(
                {
                    "name": f"model.layers.{block}.{'self_attn' if kind[0] in 'qkvo' else 'mlp'}.{kind}",
                    "block": block,
                    "kind": kind,
                    "shape": [m, n],
                    "rank": rank,
                    "keep": round(keep, 4),
                    "params": rank * (m + n),
                    "calib_rel_error": round(0.05 + 0.3 * (1 - keep), 4),
                }
            )
    return out


def method_config(method: str) -> dict[str, Any]:
    """The full config the installed registry gives ``method`` (as the engine records it), so that
    fixture records are current, not stale; a stand-in for names the registry does not know."""
    if method == "dense":
        return {}
    config = current_config(method)
    if config is not None:
        return config
    return {
        "allocator": {"name": ALLOCATOR.get(method, "uniform")},
        "factorizer": {"name": "plain" if method == "svd" else "whitened"},
        "refiner": {"name": "adacomp" if "adacomp" in method or method == "adasvd" else "none"},
    }


def make_record(method: str, ratio: float, seed: int = 0, **overrides: Any) -> dict[str, Any]:
    """One schema-v1 record for ``CELLS[(method, ratio, seed)]`` (or zeros if not listed)."""
    wt2, ptb, accs = CELLS.get((method, ratio, seed), (20.0, 40.0, [0.5] * len(TASK_METRIC)))
    dense = method == "dense"
    tasks = {
        t: {
            "acc": a - 0.01,
            "acc_stderr": 0.01,
            "acc_norm": a,
            "acc_norm_stderr": 0.01,
            "n_docs": 500,
            "metric": TASK_METRIC[t],
            "value": a,
            "source": "local-pack",
        }
        for t, a in zip(TASK_METRIC, accs, strict=True)
    }
    rec: dict[str, Any] = {
        "schema_version": 1,
        "run_key": f"{method}-{ratio}-{seed}".replace("+", "_"),
        "status": "ok",
        "error": None,
        "model": {
            "id": f"/models/{MODEL}",
            "name": MODEL,
            "revision": None,
            "content_hash": "sha256:toy",
            "family": "llama",
            "n_blocks": N_BLOCKS,
        },
        "method": {"name": method, "config": method_config(method)},
        "ratio": ratio,
        "achieved_ratio": 0.0 if dense else ratio + 0.0003,
        "achieved_ratio_model": 0.0 if dense else ratio * 0.92,
        "params_dense": 1000,
        "params_compressed": round(1000 * (1 - ratio)),
        "params_model_dense": 1200,
        "params_model_compressed": round(1200 - 1000 * ratio),
        "calibration": None
        if dense
        else {
            "source": "file:/data/wikitext2/train.txt",
            "samples": 32,
            "seqlen": 256,
            "seed": seed,
            "token_hash": "tok",
        },
        "limit": None,
        "metrics": {
            "wikitext2": {
                "ppl": wt2,
                "protocol": "wikitext2@2048",
                "tokens": 340000,
                "windows": 166,
                "nonfinite_windows": 0,
            },
            "ptb": {
                "ppl": ptb,
                "protocol": "ptb@test-2048",
                "tokens": 82000,
                "windows": 40,
                "nonfinite_windows": 0,
            },
            "zeroshot": {
                "protocol": "zeroshot@lm-eval-0.4.13",
                "average": sum(accs) / len(accs),
                "task_set": "default-offline",
                "limit": None,
                "tasks": tasks,
                "raw": {"results": {}},
            },
        },
        "timings_s": {"load": 1.0, "statistics": 2.0, "compress": 3.0, "eval": 4.0},
        "peak_memory_bytes": 123,
        "numerics": {},
        "provenance": {
            "svdbench_version": "0.1.0",
            "git_sha": "f00dfeed",
            "git_dirty": False,
            "torch": "2.6",
            "transformers": "4.51",
            "device": "cpu",
            "dtype": "float32",
            "seed": seed,
        },
        "layers": [] if dense else _layers(method, ratio),
    }
    for dotted, value in overrides.items():  # e.g. metrics__wikitext2__ppl=1.0
        node = rec
        *path, last = dotted.split("__")
        for p in path:
            node = node[p]
        node[last] = value
    return rec


def fixture_records() -> list[dict[str, Any]]:
    """The full fixture: every CELLS entry, one --limit smoke record, one failed record."""
    records = [make_record(m, r, s) for (m, r, s) in CELLS]
    limited = make_record("svd-llm", 0.6, limit=10, metrics__wikitext2__ppl=30.1)
    limited["metrics"]["zeroshot"]["limit"] = 10
    records.append(limited)
    failed = make_record(
        "adasvd", 0.6, status="failed", error="Traceback...\ntorch.OutOfMemoryError: CUDA OOM"
    )
    failed["metrics"] = {}
    records.append(failed)
    return records


def write_store(directory: Path, records: list[dict[str, Any]]) -> Path:
    """Write one ``<run_key>.json`` per record, as the engine does."""
    directory.mkdir(parents=True, exist_ok=True)
    for rec in records:
        (directory / f"{rec['run_key']}.json").write_text(json.dumps(rec, indent=1))
    return directory


def zeroshot_record(
    method: str, ratio: float, seed: int = 0, *, bits: dict[str, str], every: int | None = None, **overrides: Any
) -> dict[str, Any]:
    """A zero-shot-only record, as a separate ``--eval zeroshot`` run writes it, with per-document data.

    ``bits``: task -> one '0'/'1' per document of the task's reported metric (``TASK_METRIC``, or
    ``acc_norm`` for other tasks); the task's value is their mean and the average the mean of the
    values. ``every``: the subset protocol ``:every{k}`` (documents 0, k, 2k, ...).
    """
    rec = make_record(method, ratio, seed, **overrides)
    step = every or 1
    tasks = {}
    for task, b in bits.items():
        metric = TASK_METRIC.get(task, "acc_norm")
        value = sum(c == "1" for c in b) / len(b)
        tasks[task] = {
            "acc": value, "acc_stderr": 0.01, "acc_norm": value, "acc_norm_stderr": 0.01,
            "n_docs": len(b), "n_docs_total": len(b) * step, "metric": metric, "value": value,
            "source": "local-pack", "lm_eval_task": task, "version": 1.0,
            "per_doc": {"doc_ids": [i * step for i in range(len(b))], "acc": b, "acc_norm": b},
        }
    rec["metrics"] = {
        "zeroshot": {
            "protocol": "zeroshot@lm-eval-0.4.13" + (f":every{every}" if every else ""),
            "subset": {"every": every} if every else None,
            "average": sum(t["value"] for t in tasks.values()) / len(tasks),
            "task_set": "custom",
            "limit": None,
            "tasks": tasks,
        }
    }
    rec["run_key"] = f"{rec['run_key']}-zs"
    return rec


def ppl_record(method: str, ratio: float, seed: int = 0, ppl: float = 10.0, **overrides: Any) -> dict[str, Any]:
    """A perplexity-only record (``--eval wikitext2``) of the same cell: another file, another run key."""
    rec = make_record(method, ratio, seed, **overrides)
    rec["metrics"] = {"wikitext2": {**rec["metrics"]["wikitext2"], "ppl": ppl}}
    rec["run_key"] = f"{rec['run_key']}-ppl"
    return rec
