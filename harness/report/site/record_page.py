"""One record's detail page: method config, calibration, per-layer ranks/keeps/errors, provenance, metrics.

The page shows the record as stored, not a summary of it, and ends with the record's JSON. A failed record shows its traceback and a stale one why it is stale, and neither
shows a metric as if it were a result.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from harness.report.entries import method_display_name
from harness.report.metrics import is_metric_column, resolve_metric
from harness.report.site.markup import esc, facts, json_block, page, plain_table
from harness.report.store import flatten_metrics

__all__ = ["detail_page", "LAYER_COLUMNS"]

#: Per-layer fields in display order; other scalar fields follow alphabetically (``info`` stays in the JSON).
LAYER_COLUMNS: tuple[str, ...] = (
    "name", "block", "kind", "shape", "rank", "keep", "params", "calib_rel_error", "calib_rel_error_compressed",
)
_NUMERIC = {"block", "rank", "keep", "params", "calib_rel_error", "calib_rel_error_compressed"}


def _layers_table(layers: Sequence[Mapping[str, Any]]) -> str:
    if not layers:
        return '<p class="muted">No per-layer data in this record (the dense model is not factorised).</p>'
    present = {k for lay in layers for k, v in lay.items() if not isinstance(v, dict)}
    cols = [c for c in LAYER_COLUMNS if c in present] + sorted(present - set(LAYER_COLUMNS))
    rows = []
    for lay in layers:
        row = []
        for c in cols:
            v = lay.get(c)
            if c == "shape" and isinstance(v, (list, tuple)):
                v = "×".join(str(x) for x in v)
            row.append(v)
        rows.append(row)
    numeric = [c in _NUMERIC for c in cols]
    return plain_table(cols, rows, numeric, cls="sortable layers")


def _metrics_table(metrics: Mapping[str, Any] | None) -> str:
    flat = flatten_metrics(metrics)
    if not flat:
        return '<p class="muted">No metrics in this record.</p>'
    rows = []
    for key, value in flat.items():
        label = ""
        if is_metric_column(key):
            spec = resolve_metric(key, flat)
            label = f"{spec.label}{spec.arrow}"
        rows.append([key, label, value])
    return plain_table(["key", "column", "value"], rows, [False, False, True], cls="sortable metrics")


def detail_page(
    record: Mapping[str, Any],
    *,
    status: str,
    stale_reason: str | None = None,
    smoke: Sequence[str] = (),
    source: str = "",
) -> str:
    """The detail page of one record (a file one folder below the site root).

    Args:
        record: The record as read from disk.
        status: ``ok``, ``failed`` or ``stale``.
        stale_reason: Why the record is stale (:mod:`harness.report.staleness`), if it is.
        smoke: Smoke-run notes (``--limit``, first-N windows), empty for full evaluations.
        source: The record's path relative to the results directory (shown, not linked).

    Returns:
        The page's HTML.
    """
    model = record.get("model") or {}
    method = record.get("method") or {}
    calib = record.get("calibration") or {}
    name = str(method.get("name") or "?")
    label = method_display_name(name)
    ratio = record.get("ratio")
    ratio_text = f"{float(ratio) * 100:.4g}%" if isinstance(ratio, (int, float)) else "?"
    title = f"{label} at {ratio_text}, {model.get('name') or model.get('id') or '?'}"
    seed = (record.get("provenance") or {}).get("seed", calib.get("seed"))
    badges = [f'<span class="status {esc(status)}">{esc(status)}</span>']
    badges += [f'<span class="status smoke">{esc(s)}</span>' for s in smoke]
    parts = [
        "<header>",
        '<p><a href="../index.html">← leaderboard</a> · <a href="#record-json">the record as stored</a></p>',
        f"<h1>{esc(title)}</h1>",
        f'<p>{" ".join(badges)} <span class="muted">method <code>{esc(name)}</code>, seed {esc(seed)}, '
        f"run key <code>{esc(record.get('run_key'))}</code></span></p>",
        "</header>",
        "<main>",
    ]
    if status == "failed":
        parts.append('<p class="notice error">This run failed; it has no results. Its error:</p>')
        parts.append(f"<pre>{esc(record.get('error') or 'no error text recorded')}</pre>")
    if stale_reason:
        parts.append(f'<p class="notice">Stale: {esc(stale_reason)}. Its numbers are not shown in the leaderboard.</p>')
    parts += [
        "<h2>Cell</h2>",
        facts(
            [
                ("model", model.get("name")),
                ("model id", model.get("id")),
                ("content hash", model.get("content_hash")),
                ("revision", model.get("revision")),
                ("family", model.get("family")),
                ("blocks", model.get("n_blocks")),
                ("ratio (requested)", ratio),
                ("achieved ratio (target linears)", record.get("achieved_ratio")),
                ("achieved ratio (all parameters)", record.get("achieved_ratio_model")),
                ("params dense / compressed", f"{record.get('params_dense')} / {record.get('params_compressed')}"),
                (
                    "model params dense / compressed",
                    f"{record.get('params_model_dense')} / {record.get('params_model_compressed')}",
                ),
                ("limit", record.get("limit")),
                ("source file", source),
            ]
        ),
        "<h2>Metrics (stale: not a current result)</h2>" if stale_reason else "<h2>Metrics</h2>",
        _metrics_table(record.get("metrics") if status != "failed" else None),
        "<h2>Method config</h2>",
        json_block(method.get("config") or {}),
        "<h2>Calibration</h2>",
        facts(calib) if calib else '<p class="muted">No calibration (dense model).</p>',
        f"<h2>Per-layer ranks, keeps and errors ({len(record.get('layers') or [])} layers)</h2>",
        _layers_table(record.get("layers") or []),
        "<h2>Provenance</h2>",
        facts(record.get("provenance") or {}),
        "<h2>Cost and numerics</h2>",
        facts(
            [
                *((f"time {k} (s)", v) for k, v in (record.get("timings_s") or {}).items()),
                ("peak memory (bytes)", record.get("peak_memory_bytes")),
                ("statistics cached", record.get("statistics_cached")),
            ]
        ),
    ]
    if record.get("numerics"):
        parts += ["<h3>Numerics</h3>", json_block(record["numerics"])]
    if record.get("probes"):
        parts += ["<h3>Probes</h3>", json_block(record["probes"])]
    # The record itself, for forensics. Embedded rather than written as a .json file beside the page:
    # a site written inside a results directory must not add files the record reader would load.
    parts += [
        '<h2 id="record-json">The record as stored</h2>',
        "<details><summary>JSON</summary>",
        f'<pre class="record">{esc(json.dumps(record, indent=1, sort_keys=True, default=str))}</pre>',
        "</details>",
    ]
    parts += ["</main>", '<footer><p class="muted">svdbench record page</p></footer>']
    return page(title, "\n".join(parts), depth=1)
