"""Runs: a validated configuration (:mod:`.config`), a loaded model with its statistics
(:mod:`.session`) and the one loop that turns cells into records (:mod:`.loop`).

``svdbench run`` calls :func:`run`; every sweep executor calls :func:`run_cells` for a group of
cells that share a model and a calibration.
"""

from harness.runs.config import (
    Prepared,
    RunConfig,
    draw_calibration,
    eval_options,
    freeze_eval_options,
    key_fields,
    planned_keys,
    prepare,
    resolve_device,
    resolve_dtype,
)
from harness.runs.loop import DENSE, CellOutcome, run, run_cells
from harness.runs.session import Session

__all__ = [
    "DENSE", "CellOutcome", "Prepared", "RunConfig", "Session", "draw_calibration", "eval_options",
    "freeze_eval_options", "key_fields", "planned_keys", "prepare", "resolve_device", "resolve_dtype", "run", "run_cells",
]
