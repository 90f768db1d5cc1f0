"""Shared figure style: paper-column sizing, TrueType fonts, Okabe-Ito colours, one style per method.

Every figure goes through :func:`paper_style` and :func:`save_figure`, so all figures of a paper
agree on fonts, sizes and, above all, on the colour and marker of each method (style notes C2/C3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from harness.records import git_state
from harness.report.entries import method_display_name

__all__ = [
    "OKABE_ITO",
    "COLUMN_WIDTH_IN",
    "PAGE_WIDTH_IN",
    "PAPER_RC",
    "MethodStyle",
    "METHOD_STYLES",
    "method_style",
    "paper_style",
    "new_figure",
    "git_sha",
    "save_figure",
]

logger = logging.getLogger(__name__)

#: Okabe & Ito (2008) colour-blind-safe palette.
OKABE_ITO: dict[str, str] = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "bluish_green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "reddish_purple": "#CC79A7",
}

COLUMN_WIDTH_IN = 3.25  # one column of a two-column venue (ICML); ACL is ~3.0
PAGE_WIDTH_IN = 6.75  # full text width of a two-column venue

PAPER_RC: dict[str, Any] = {
    # Type 42 = embedded TrueType; the default Type 3 is rejected by some camera-ready checks.
    "pdf.fonttype": 42,
    "ps.fonttype": 42,
    "font.family": "serif",
    # Times-like first when installed; STIX ships with matplotlib, so the fallback is still Times-like.
    "font.serif": ["Times New Roman", "Nimbus Roman", "TeX Gyre Termes", "STIXGeneral", "DejaVu Serif"],
    "mathtext.fontset": "stix",
    "font.size": 8,
    "axes.labelsize": 9,
    "axes.titlesize": 9,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "legend.fontsize": 7.5,
    "legend.frameon": False,
    "legend.handlelength": 1.8,
    "lines.linewidth": 1.2,
    "lines.markersize": 4,
    "axes.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.5,
    "xtick.major.width": 0.6,
    "ytick.major.width": 0.6,
    "figure.figsize": (COLUMN_WIDTH_IN, 2.2),
    "figure.dpi": 100,
    "savefig.dpi": 300,
    "savefig.bbox": "tight",
    "savefig.pad_inches": 0.01,
}


@dataclass(frozen=True)
class MethodStyle:
    """Line style of one method; identical in every figure."""

    color: str
    marker: str
    linestyle: str = "-"
    label: str = ""

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Axes.plot``."""
        return {"color": self.color, "marker": self.marker, "linestyle": self.linestyle, "label": self.label}


# Fixed assignments for the methods we ship. Black is reserved for the dense reference.
# Labels come from the one table of display names (harness.report.entries), as in every report.
METHOD_STYLES: dict[str, MethodStyle] = {
    name: MethodStyle(OKABE_ITO[color], marker, line, method_display_name(name))
    for name, color, marker, line in (
        ("dense", "black", "", "--"),
        ("svd", "orange", "o", "-"),
        ("svd-llm", "sky_blue", "s", "-"),
        ("adasvd", "bluish_green", "^", "-"),
        ("ressvd", "vermillion", "D", "-"),
        ("duo-svd", "reddish_purple", "v", "-"),
        ("fwsvd", "blue", "P", "-"),
        ("asvd", "yellow", "X", "-"),
        ("svd-llm-v2", "sky_blue", "*", "--"),
        ("basis-sharing", "blue", "h", "--"),
    )
}

# Fallback pools for methods not in the table: markers the table does not use, and all palette
# colours except black. Yellow comes last because it is the hardest to read on white.
_FALLBACK_COLORS = [
    OKABE_ITO[k]
    for k in ("blue", "reddish_purple", "bluish_green", "orange", "vermillion", "sky_blue", "yellow")
]
_FALLBACK_MARKERS = ["P", "X", "*", "h", "<", ">", "p", "d"]
_VARIANT_LINESTYLES = ["--", "-.", ":"]


def _digest(name: str) -> int:
    # sha256, not hash(): Python salts str hashes per process, and styles must not change between runs.
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")


def method_style(name: str) -> MethodStyle:
    """The style of a method, deterministic for names outside :data:`METHOD_STYLES`.

    A variant ``"parent+suffix"`` keeps its parent's colour (the family is recognisable) and gets
    a hashed marker and a dashed/dotted line; an unknown method gets a hashed colour and marker.
    A method with options (``"asvd[...]"``) is drawn as the method without them, with a
    dash-dotted line so that both stay apart when a figure shows both.
    """
    if name in METHOD_STYLES:
        return METHOD_STYLES[name]
    base = name.partition("[")[0]
    if base != name:
        return dataclasses.replace(method_style(base), linestyle="-.", label=method_display_name(name))
    digest = _digest(name)
    parent, _, variant = name.partition("+")
    marker = _FALLBACK_MARKERS[digest % len(_FALLBACK_MARKERS)]
    if variant and parent in METHOD_STYLES:
        linestyle = _VARIANT_LINESTYLES[(digest >> 8) % len(_VARIANT_LINESTYLES)]
        return MethodStyle(METHOD_STYLES[parent].color, marker, linestyle, method_display_name(name))
    color = _FALLBACK_COLORS[(digest >> 16) % len(_FALLBACK_COLORS)]
    return MethodStyle(color, marker, "-", method_display_name(name))


@contextlib.contextmanager
def paper_style(overrides: Mapping[str, Any] | None = None) -> Iterator[None]:
    """Context manager applying :data:`PAPER_RC` (plus ``overrides``) without touching global rcParams."""
    with matplotlib.rc_context({**PAPER_RC, **(overrides or {})}):
        yield


def new_figure(
    nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **subplot_kw: Any
) -> tuple[Figure, np.ndarray]:
    """A figure on the Agg canvas with a ``(nrows, ncols)`` array of axes and constrained layout.

    Figures are built without pyplot: no global backend switch for the caller (a notebook keeps
    its backend) and no figure manager that would keep closed figures alive in long sweeps.
    """
    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **subplot_kw)
    return fig, axes


def git_sha(path: str | Path | None = None) -> str:
    """The current commit of the repository holding ``path`` (default: this package), or ``"unknown"``.

    A ``-dirty`` suffix is added when tracked files have uncommitted changes, because a figure
    from uncommitted code cannot be regenerated from the sha alone.
    """
    where = Path(path) if path is not None else Path(__file__).resolve().parent
    state = git_state(where)
    if state["git_sha"] is None:
        logger.info("could not read the git sha of %s; recording 'unknown'", where)
        return "unknown"
    return state["git_sha"] + ("-dirty" if state["git_dirty"] else "")


def save_figure(
    fig: Figure,
    out_dir: str | Path,
    stem: str,
    *,
    sha: str,
    sweep_id: str | None,
    title: str,
    extra: Mapping[str, str] | None = None,
) -> list[Path]:
    """Write ``<stem>.pdf`` (vector, TrueType fonts) and ``<stem>.png`` (300 dpi).

    The git sha and sweep id go into the PDF info dictionary (``Subject``/``Keywords``) and into
    PNG text chunks, so a stray figure can be traced back to the code and the sweep it came from.

    Returns:
        ``[pdf_path, png_path]``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sweep = sweep_id or "none"
    fields = {"git_sha": sha, "sweep_id": sweep, **(extra or {})}
    keywords = "; ".join(f"{k}={v}" for k, v in fields.items())
    pdf_meta = {
        "Title": title,
        "Subject": f"svdbench figure {stem}; git_sha={sha}; sweep_id={sweep}",
        "Keywords": keywords,
        "Creator": "svdbench harness.report.plots",
        "CreationDate": None,  # reproducible bytes: same inputs, same PDF
    }
    png_meta = {
        "Title": title,
        "Software": "svdbench harness.report.plots",
        "Description": keywords,
        **fields,
    }
    pdf, png = out / f"{stem}.pdf", out / f"{stem}.png"
    fig.savefig(pdf, format="pdf", metadata=pdf_meta)
    fig.savefig(png, format="png", dpi=300, metadata=png_meta)
    logger.info("wrote %s and %s", pdf, png)
    return [pdf, png]
