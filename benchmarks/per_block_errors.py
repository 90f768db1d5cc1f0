"""Per-block view of result records: calibration errors and ranks block by block.

    python -m benchmarks.per_block_errors results/ablations/ressvd/tiny-llama [--error compressed] [--out FILE]

For each (ratio, method) one row per metric: the mean over a block's target linears of the per-layer
calibration error (``calib_rel_error`` = ``||(W - W')X|| / ||W X||`` on dense inputs, or with
``--error compressed`` ``calib_rel_error_compressed`` = ``||W' Xh - W X|| / ||W X||`` on the inputs of
the model whose earlier blocks are compressed, recorded only by methods run on the paired stream),
and the mean keep ratio of the block. Dense modules count with error 0 and keep 1, so a block left
dense reads ``0.000 / 1.00``. Use it to see where a method spends its error and its parameters.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.ablation_table import load_records

ERROR_KEYS = {"dense": "calib_rel_error", "compressed": "calib_rel_error_compressed"}


def block_means(layers: list[dict[str, Any]], key: str) -> tuple[dict[int, float | None], dict[int, float]]:
    """Per block: mean ``key`` error (None if no compressed layer recorded it) and mean keep."""
    errs: dict[int, list[float]] = defaultdict(list)
    keeps: dict[int, list[float]] = defaultdict(list)
    for layer in layers:
        block = int(layer["block"])
        keeps[block].append(1.0 if layer.get("rank") is None else float(layer["keep"]))
        if layer.get("rank") is None:
            errs[block].append(0.0)
        elif key in layer:
            errs[block].append(float(layer[key]))
    err_mean = {b: (sum(v) / len(v) if len(v) == len(keeps[b]) else None) for b, v in errs.items()}
    for b in keeps:
        err_mean.setdefault(b, None)
    return err_mean, {b: sum(v) / len(v) for b, v in keeps.items()}


def render(records: list[dict[str, Any]], error: str = "dense") -> str:
    key = ERROR_KEYS[error]
    records = [r for r in records if r.get("layers")]
    if not records:
        return "(no records with per-layer reports)\n"
    n_blocks = 1 + max(int(layer["block"]) for r in records for layer in r["layers"])
    header = ["ratio", "method", "per block"] + [str(b) for b in range(n_blocks)] + ["sum"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rec in sorted(records, key=lambda r: (r["ratio"], r["method"]["name"])):
        errs, keeps = block_means(rec["layers"], key)
        err_cells = ["—" if errs.get(b) is None else f"{errs[b]:.3f}" for b in range(n_blocks)]
        total = sum(float(layer.get(key, 0.0) if layer.get("rank") is not None else 0.0) for layer in rec["layers"])
        complete = all(errs.get(b) is not None for b in range(n_blocks))
        name, ratio = rec["method"]["name"], f"{rec['ratio']:.2f}"
        total_cell = f"{total:.3f}" if complete else "—"
        lines.append(f"| {ratio} | {name} | {error} err | " + " | ".join(err_cells) + f" | {total_cell} |")
        keep_cells = " | ".join(f"{keeps[b]:.2f}" for b in range(n_blocks))
        lines.append(f"| {ratio} | {name} | keep | {keep_cells} | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path)
    parser.add_argument("--error", choices=sorted(ERROR_KEYS), default="dense")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    text = render(load_records(args.directory), args.error)
    if args.out:
        args.out.write_text(text, encoding="utf-8")
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
