"""Static HTML leaderboard site from the record store (``svdbench leaderboard RESULTS --format html --out DIR``).

The site is plain files that open from disk or any static host, with no server and no network at
view time (the stylesheet and script are written beside the pages; no CDN)::

    DIR/index.html            one section per model: the leaderboard table, its figures beside it;
                              filters (model, protocol, ratio), sorting by any column; optional
                              regression verdicts against a baseline (``--compare BASELINE``)
    DIR/records/<key>.html    one page per record: method config, calibration, per-layer ranks,
                              keeps and errors, provenance, metrics, and the record's JSON
    DIR/figures/*.png|pdf     made by :func:`harness.report.plots.plot`
    DIR/assets/               svdbench.css, svdbench.js (:mod:`harness.report.site.assets`)

The site holds no ``.json`` file, so it may live inside a results directory without its pages
being read back as records. The tables come from :func:`harness.report.leaderboard.build_leaderboard`, the same builder as the
Markdown table, so grouping, order, mean ± spread, bold and tie marks agree. Cells whose records
all failed or are stale show that status instead of numbers; smoke records (lm-eval ``--limit``,
first-N-window perplexities) are left out unless ``allow_limited`` (then marked † / §).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from harness.report.entries import smoke_mask
from harness.report.leaderboard import RATIO_DEFINITION, LeaderboardTable, build_leaderboard
from harness.report.site.assets import SCRIPT, SCRIPT_FILE, STYLE, STYLE_FILE
from harness.report.site.markup import esc, page
from harness.report.site.record_page import detail_page
from harness.report.site.sections import Figure, compare_section, controls, model_section
from harness.report.spread import SPREAD_DEFINITION, TIE_DEFINITION
from harness.report.staleness import stale_reasons
from harness.report.store import read_records, records_to_frame, value_text

__all__ = ["write_site"]

logger = logging.getLogger(__name__)


def _page_names(tables: Sequence[LeaderboardTable]) -> dict[str, str]:
    """Record source file -> page path (``records/<run key>.html``), unique even for repeated run keys."""
    pages: dict[str, str] = {}
    used: set[str] = set()
    for t in tables:
        for members in t.rows["members"]:
            for m in members:
                source = str(m["source_file"])
                if source in pages:
                    continue
                # Run keys are hex digests in engine records, but a record is user input: keep names safe.
                base = re.sub(r"[^A-Za-z0-9._-]+", "_", str(m["run_key"] or "record")).strip("._") or "record"
                name, k = base, 1
                while name in used:  # the same record copied into two result folders
                    k += 1
                    name = f"{base}-{k}"
                used.add(name)
                pages[source] = f"records/{name}.html"
    return pages


def _smoke_notes(row: Mapping[str, Any]) -> list[str]:
    notes = []
    if row.get("limited"):
        notes.append(f"smoke: --limit {value_text(row.get('limit'))}".rstrip())
    if row.get("partial_windows"):
        notes.append("smoke: first-N windows")
    return notes


def _figure_jobs(table: LeaderboardTable) -> list[tuple[str, str | None, str]]:
    """(plot kind, metric, caption) for a model: every perplexity, the zero-shot average or an
    embedding score against ratio, then the per-layer allocation."""
    vs = "mean over seeds; error bars ±1 sample standard deviation where n ≥ 2"
    jobs: list[tuple[str, str | None, str]] = []
    for s in table.metrics:
        if s.kind == "ppl":
            jobs.append(("ppl-vs-ratio", s.key, f"{s.label} perplexity vs ratio ({vs})"))
    keys = [s.key for s in table.metrics]
    if "zeroshot.average" in keys:
        jobs.append(("zeroshot-vs-ratio", "zeroshot.average", f"Average zero-shot accuracy vs ratio ({vs})"))
    elif not jobs and table.metrics:
        s = table.metrics[0]
        jobs.append(("metric-vs-ratio", s.key, f"{s.label} vs ratio ({vs})"))
    jobs.append(("rank-allocation", None, "Kept fraction per block and projection (rank allocation), at the ratio most methods share"))
    return jobs


def _figures(
    frame: pd.DataFrame, tables: Sequence[LeaderboardTable], root: Path, git_sha: str | None
) -> dict[str, list[Figure]]:
    from harness.report.plots import plot  # matplotlib only when figures are asked for

    # Failed and stale records are left out here, so the plotting code has nothing to warn about again.
    usable = frame[(frame["status"].fillna("ok") == "ok") & stale_reasons(frame).isna()]
    out: dict[str, list[Figure]] = {}
    for t in tables:
        figs = []
        for kind, metric, caption in _figure_jobs(t):
            try:
                paths = plot(usable, kind, root / "figures", model=t.model, metric=metric, git_sha=git_sha, allow_limited=True)
            except ValueError as exc:  # e.g. no per-layer data, or no compressed cells yet
                logger.info("%s: no %s figure (%s)", t.model, kind, exc)
                continue
            pdf = next((p for p in paths if p.suffix == ".pdf"), None)
            png = next(p for p in paths if p.suffix == ".png")
            figs.append(Figure(f"figures/{png.name}", f"figures/{pdf.name}" if pdf else None, caption))
        out[t.model] = figs
    return out


def _index(
    tables: Sequence[LeaderboardTable],
    pages: Mapping[str, str],
    figures: Mapping[str, list[Figure]],
    *,
    results: str,
    n_records: int,
    n_failed: int,
    n_stale: int,
    n_smoke_left_out: int,
    compare_html: str,
) -> str:
    counts = f"{n_records} record(s): {n_failed} failed, {n_stale} stale"
    smoke = (
        f" · {n_smoke_left_out} smoke record(s) (--limit or first-N windows) left out; "
        "render with --allow-limited to include them, marked"
        if n_smoke_left_out
        else ""
    )
    sections = [
        model_section(t, pages, figures.get(t.model, []), f"model-{i}") for i, t in enumerate(tables)
    ]
    body = [
        "<header>",
        "<h1>svdbench leaderboard</h1>",
        f'<p class="muted">From <code>{esc(results)}</code>: {esc(counts)}{esc(smoke)}.</p>',
        "</header>",
        "<main>",
        controls(tables),
        '<p class="caption">'
        + esc(
            f"{RATIO_DEFINITION}. Values: {SPREAD_DEFINITION}. Bold: best per ratio group and column "
            f"(dense row excluded). {TIE_DEFINITION}; zero-shot columns also pair the methods over "
            "documents (rules and marks in the notes under each table). Click a column header to sort (again to reverse), "
            "a row to open its record; the dense reference stays on top."
        )
        + "</p>",
        *sections,
        compare_html,
        "</main>",
        '<footer><p>Static page written by svdbench (harness.report.site.writer); it needs no server and no network.</p></footer>',
    ]
    return page("svdbench leaderboard", "\n".join(body), depth=0)


def write_site(
    results: str | Path,
    out_dir: str | Path,
    *,
    metrics: Sequence[str] | None = None,
    model: str | None = None,
    allow_limited: bool = False,
    baseline: str | Path | None = None,
    rtol: float = 0.02,
    figures: bool = True,
    git_sha: str | None = None,
) -> Path:
    """Write the static leaderboard site of a results directory.

    Args:
        results: Results directory (searched recursively) or one record file.
        out_dir: Site directory (created; files of an earlier site there are overwritten, others kept).
        metrics: Metric names/aliases for the columns; default: every metric present.
        model: Only this model (name or id); default: every model.
        allow_limited: Include smoke records (``--limit``, first-N windows), marked; left out by default.
        baseline: Also render regression verdicts of ``results`` against this results directory.
        rtol: Relative tolerance of those verdicts.
        figures: Draw the figures (PNG shown, PDF linked); False skips matplotlib entirely.
        git_sha: Recorded in the figures' metadata (default: this checkout's).

    Returns:
        The path of ``index.html``.

    Raises:
        FileNotFoundError: ``results`` or ``baseline`` does not exist.
        ValueError: No usable records, unknown model, mixed protocols in a column.
        StoreError: A malformed record (the message names the file).
    """
    root = Path(out_dir)
    records = read_records(results)
    by_source = {str(r["_source_file"]): r for r in records}
    frame = records_to_frame(records, include_failed=True)
    smoke = smoke_mask(frame)
    n_smoke_left_out = 0 if allow_limited else int(smoke.sum())
    if n_smoke_left_out:
        logger.warning("leaving out %d smoke record(s) (--limit or first-N windows); pass allow_limited to include them", n_smoke_left_out)
        frame = frame[~smoke]
    tables = build_leaderboard(frame, metrics=metrics, allow_limited=True, model=model, include_unusable=True)
    pages = _page_names(tables)
    (root / "records").mkdir(parents=True, exist_ok=True)
    (root / "assets").mkdir(parents=True, exist_ok=True)
    (root / STYLE_FILE).write_text(STYLE, encoding="utf-8")
    (root / SCRIPT_FILE).write_text(SCRIPT, encoding="utf-8")
    frame_by_source = {str(r["source_file"]): r for r in frame.to_dict("records")}
    results_root = Path(results) if Path(results).is_dir() else Path(results).parent
    statuses: dict[str, str] = {}
    for t in tables:
        for members in t.rows["members"]:
            for m in members:
                source = str(m["source_file"])
                statuses[source] = str(m["status"])
                rec = {k: v for k, v in by_source[source].items() if k != "_source_file"}
                path = root / pages[source]
                html_text = detail_page(
                    rec,
                    status=str(m["status"]),
                    stale_reason=m.get("stale"),
                    smoke=_smoke_notes(frame_by_source.get(source, {})),
                    source=os.path.relpath(source, results_root),
                )
                path.write_text(html_text, encoding="utf-8")
    figs = _figures(frame, tables, root, git_sha) if figures else {}
    compare_html = ""
    if baseline is not None:
        from harness.report.compare import compare

        compare_html = compare_section(compare(results, baseline, rtol=rtol, metrics=metrics), str(baseline))
    index = root / "index.html"
    shown_path = Path(os.path.abspath(results))
    with_cwd = Path.cwd()
    # A published page should not carry this machine's absolute paths: relative to the working directory.
    shown = str(shown_path.relative_to(with_cwd)) if shown_path.is_relative_to(with_cwd) else shown_path.name
    index.write_text(
        _index(
            tables, pages, figs, results=shown, n_records=len(statuses),
            n_failed=sum(s == "failed" for s in statuses.values()),
            n_stale=sum(s == "stale" for s in statuses.values()),
            n_smoke_left_out=n_smoke_left_out, compare_html=compare_html,
        ),
        encoding="utf-8",
    )
    logger.info("wrote %s (%d record pages, %d figures)", index, len(pages), sum(len(f) for f in figs.values()))
    return index
