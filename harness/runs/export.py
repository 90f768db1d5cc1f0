"""Exporting the cells of a run: a session's compressed model written in the factorised format of
:mod:`harness.export` (``svdbench export``, and ``svdbench run --export``).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from harness.export import ExportError, compression_summary, export_is_complete, export_model
from harness.runs.config import prepare
from harness.runs.session import Session

log = logging.getLogger(__name__)

__all__ = ["compress_and_export", "export_cell", "export_from_config"]


def export_cell(session: Any, method: Any, ratio: float, key: str, result: Any) -> Path:
    """Export the session's model, compressed right now for cell ``key``, to ``<--export>/<key>``.

    An existing complete export of the same cell is kept (a re-run resumes).

    Args:
        session: :class:`harness.runs.session.Session` whose model is compressed.
        method: The :class:`methods.Method`.
        ratio: Requested ratio.
        key: The cell's run key (also the directory name).
        result: The cell's :class:`harness.engine.compress.CompressionResult`.
    """
    out = Path(session.cfg.export) / key
    if export_is_complete(out, key):
        log.info("export exists: %s", out)
        return out
    if out.exists():
        shutil.rmtree(out)  # an export of another cell or a damaged one under this cell's name
    return export_model(session.model, session.tokenizer, out, method={"name": method.name, "config": method.config()},
                        ratio=ratio, run_key=key, base_model=session.model_info, compression=compression_summary(result))


def compress_and_export(session: Any, method: Any, ratio: float, out: Path | str | None = None) -> Path:
    """Compress the session's dense model, export it (no evaluation), restore the dense model.

    Args:
        session: A :class:`harness.runs.session.Session`.
        method: The :class:`methods.Method`.
        ratio: Fraction of target-linear parameters removed.
        out: Target directory; default ``<session.cfg.export>/<run key>``.

    Returns:
        The export directory.
    """
    method_block = {"name": method.name, "config": method.config()}
    key = session.cell_key(method, ratio)
    if out is None and export_is_complete(Path(session.cfg.export) / key, key):
        log.info("export exists: %s", Path(session.cfg.export) / key)
        return Path(session.cfg.export) / key
    cell = session.install_stored(method, ratio) or session.compress(method, ratio)
    try:
        if out is None:
            return export_cell(session, method, ratio, key, cell.result)
        return export_model(session.model, session.tokenizer, out, method=method_block, ratio=ratio, run_key=key,
                            base_model=session.model_info, compression=compression_summary(cell.result))
    finally:
        session.restore(cell)


def export_from_config(cfg: Any, out: Path | str) -> Path:
    """``svdbench export``: compress ``cfg.model`` with its one method at its one ratio and export to ``out``.

    The evaluation flags of ``cfg`` are not run; they only enter the recorded run key, so that it
    names the record a ``svdbench run`` with the same flags writes.
    """
    if len(cfg.methods) != 1 or len(cfg.ratios) != 1:
        raise ValueError(f"export takes one method and one ratio, got {len(cfg.methods)} and {len(cfg.ratios)}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"export directory {out} exists and is not empty; remove it or choose another")
    prep = prepare(cfg)
    torch.manual_seed(cfg.seed)
    session = Session(prep)
    return compress_and_export(session, prep.methods[0], cfg.ratios[0], out)
