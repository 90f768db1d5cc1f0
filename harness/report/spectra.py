"""Singular-value spectra with and without whitening (the reason whitened SVD truncates better).

Spectra are too large for result records, so the engine dumps them to a separate file; this
module defines that file's format (:func:`load_spectra`) and draws it (:func:`spectra_figure`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from harness.report import style

__all__ = ["load_spectra", "spectra_figure"]


def load_spectra(path: str | Path) -> list[dict[str, Any]]:
    """Read a spectra dump written by the engine.

    Accepted layouts:
        * JSON: a list of ``{"layer": name, "plain": [...], "whitened": [...], "rank": k?}``, a
          single such object, or ``{"spectra": [...]}``.
        * npz: arrays ``plain:<layer>`` and ``whitened:<layer>`` (optional scalar ``rank:<layer>``).

    Returns:
        Entries with ``layer``, ``plain`` and ``whitened`` as float arrays (descending), ``rank`` or None.

    Raises:
        ValueError: If the file has none of these layouts.
    """
    path = Path(path)
    entries: list[dict[str, Any]] = []
    if path.suffix == ".npz":
        with np.load(path) as data:
            for key in data.files:
                if key.startswith("plain:"):
                    layer = key.split(":", 1)[1]
                    rank = data[f"rank:{layer}"] if f"rank:{layer}" in data.files else None
                    entries.append(
                        {
                            "layer": layer,
                            "plain": data[key],
                            "whitened": data.get(f"whitened:{layer}"),
                            "rank": None if rank is None else int(rank),
                        }
                    )
    else:
        raw = json.loads(path.read_text(encoding="utf-8"))
        raw = raw.get("spectra", raw) if isinstance(raw, Mapping) else raw
        entries = [dict(e) for e in (raw if isinstance(raw, list) else [raw])]
    for e in entries:
        if "layer" not in e or "plain" not in e:
            raise ValueError(f"{path}: spectra entries need 'layer' and 'plain' (and usually 'whitened')")
        for k in ("plain", "whitened"):
            if e.get(k) is not None:
                e[k] = np.sort(np.asarray(e[k], dtype=float))[::-1]
        e.setdefault("whitened", None)
        e.setdefault("rank", None)
    if not entries:
        raise ValueError(f"{path}: no spectra found")
    return entries


def _short_layer(name: str) -> str:
    m = re.search(r"layers?\.(\d+)\..*?([^.]+)$", name)
    return f"block {m.group(1)} · {m.group(2)}" if m else ".".join(name.split(".")[-2:])


def spectra_figure(entries: list[dict[str, Any]], layers: Sequence[str] | None = None) -> Figure:
    """Normalised spectra (σ_i/σ_1, log y), plain vs whitened, one panel per layer.

    Args:
        entries: From :func:`load_spectra`.
        layers: Layer names to show; default: up to four spread from the first to the last entry.

    Returns:
        The (unsaved) figure.
    """
    if layers:
        chosen = [e for e in entries if e["layer"] in set(layers)]
        missing = set(layers) - {e["layer"] for e in chosen}
        if missing:
            raise ValueError(f"layers not in the spectra file: {sorted(missing)}")
    else:  # a real model has hundreds of layers: show four spread from first to last
        idx = sorted({round(i) for i in np.linspace(0, len(entries) - 1, min(4, len(entries)))})
        chosen = [entries[i] for i in idx]
    ncols = min(len(chosen), 4)
    nrows = math.ceil(len(chosen) / ncols)
    width = style.PAGE_WIDTH_IN if ncols > 2 else style.COLUMN_WIDTH_IN
    fig, axes = style.new_figure(nrows, ncols, figsize=(width, 0.35 + 1.5 * nrows), sharey=True)
    # Plain vs whitened reuses the SVD / SVD-LLM colours: that is the pair of methods they stand for.
    curves = (
        ("plain", "plain $W$", style.METHOD_STYLES["svd"].color),
        ("whitened", "whitened $WS$", style.METHOD_STYLES["svd-llm"].color),
    )
    for i, (ax, e) in enumerate(zip(axes.flat, chosen, strict=False)):
        for key, label, color in curves:
            s = e.get(key)
            if s is None or len(s) == 0 or s[0] <= 0:
                continue
            ax.plot(
                np.arange(1, len(s) + 1),
                s / s[0],
                color=color,
                label=label if i == 0 else None,
                linewidth=1.1,
            )
        if e.get("rank"):
            ax.axvline(
                e["rank"], color="0.4", linestyle=":", linewidth=0.9, label="kept rank" if i == 0 else None
            )
        ax.set_yscale("log")
        ax.set_title(_short_layer(e["layer"]), fontsize=8, pad=2)
        ax.set_xlabel("Index $i$")
        if i % ncols == 0:
            ax.set_ylabel(r"$\sigma_i / \sigma_1$")
    for ax in list(axes.flat)[len(chosen) :]:
        ax.set_visible(False)
    fig.legend(loc="outside upper center", ncol=3, columnspacing=1.0, handletextpad=0.4)
    return fig
