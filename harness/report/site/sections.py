"""The site's leaderboard page parts: one section per model (table + figures), filters, compare verdicts.

The table is a :class:`~harness.report.leaderboard.LeaderboardTable` from the one table builder
(:func:`~harness.report.leaderboard.build_leaderboard`), so grouping, order, n, mean ± spread,
bold and tie marks, and cell texts are exactly the Markdown table's; this module only adds the
markup the script needs (``data-*`` values for sorting and filtering, links to record pages).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from harness.report.compare import CompareResult
from harness.report.leaderboard import LeaderboardTable
from harness.report.paired import PAIRED_TIE_DEFINITION, is_paired_column
from harness.report.site.markup import attrs, esc
from harness.report.spread import TIE_DEFINITION, TIE_MARK, is_tie

__all__ = ["Figure", "ratio_key", "ratio_label", "model_section", "controls", "compare_section"]


@dataclass(frozen=True)
class Figure:
    """A figure shown beside a model's table (paths relative to the site root)."""

    png: str
    pdf: str | None
    caption: str


def ratio_key(ratio: float) -> str:
    """The ratio as the filters and rows spell it (``"0.4"``)."""
    return f"{round(float(ratio), 6):g}"


def ratio_label(ratio: float) -> str:
    """The ratio as tables print it (``"40%"``)."""
    return f"{float(ratio) * 100:.4g}%"


def _member_links(members: Sequence[Mapping[str, object]], pages: Mapping[str, str]) -> str:
    links = []
    for m in members:
        href = pages.get(str(m["source_file"]))
        text = f"seed {m['seed'] or '?'}" + ("" if m["status"] == "ok" else f" ({m['status']})")
        text += " (copy)" if m.get("copy") else ""  # the same record in another results folder
        links.append(f'<a{attrs(href=href)}>{esc(text)}</a>' if href else esc(text))
    return '<span class="seeds">' + ", ".join(links) + "</span>"


def _metric_cell(table: LeaderboardTable, i: int, key: str, protocol: str | None) -> str:
    row = table.rows.loc[i]
    if row["status"] != "ok":
        status = str(row["status"])
        return f'<td{attrs(data_value="", data_protocol=protocol)}><span class="status {esc(status)}">{esc(status)}</span></td>'
    mean = row[key]
    value = "" if pd.isna(mean) or not math.isfinite(float(mean)) else repr(float(mean))
    text = esc(table.cell_text(i, key))
    mark = table.marks.at[i, key]
    classes = " ".join(c for c in ("best" if mark else "", "tie" if is_tie(mark) else "") if c) or None
    if mark:
        text = f"<strong>{text}</strong>"
    if is_tie(mark):
        rule = f"{TIE_MARK} tie, {PAIRED_TIE_DEFINITION}" if is_paired_column(key) else TIE_DEFINITION
        text += f'<sup title="{esc(rule)}">{TIE_MARK}</sup>'
    return f"<td{attrs(class_=classes, data_value=value, data_protocol=protocol)}>{text}</td>"


def _table(table: LeaderboardTable, pages: Mapping[str, str]) -> str:
    protocols = {s.key: (table.protocols.get(s.key) or [None])[0] for s in table.metrics}
    head = [
        '<th data-type="num">Ratio</th>',
        '<th data-type="text" class="text">Method</th>',
        '<th data-type="num" title="number of seeds">n</th>',
    ]
    for s in table.metrics:
        head.append(
            f"<th{attrs(data_type='num', data_key=s.key, data_protocol=protocols[s.key], data_first='desc' if s.higher_is_better else 'asc', title=protocols[s.key])}>"
            f"{esc(table.header_text(s))}</th>"
        )
    groups = table.group_keys()
    body = []
    for i, r in table.rows.iterrows():
        members = list(r["members"])
        ok_pages = [pages[str(m["source_file"])] for m in members if m["status"] == "ok" and str(m["source_file"]) in pages]
        any_pages = [pages[str(m["source_file"])] for m in members if str(m["source_file"]) in pages]
        href = (ok_pages or any_pages or [None])[0]
        group_start = i == 0 or groups[i] != groups[i - 1]
        classes = " ".join(c for c in ("group-start" if group_start else "", "pinned" if r["is_dense"] else "") if c)
        ratio = 0.0 if r["is_dense"] else float(r["ratio"])
        label = esc(table.label_text(i))
        method = f'<a{attrs(href=href)}>{label}</a>' if href else label
        if len(members) > 1:
            method += " " + _member_links(members, pages)
        if r["note"]:
            method += f' <span class="note" title="{esc(r["note"])}">⚠</span>'
        n = int(r["n_seeds"]) if r["status"] == "ok" else None
        cells = [
            f"<td{attrs(data_value=ratio)}>{esc('0%' if r['is_dense'] else ratio_label(ratio))}</td>",
            f'<td{attrs(data_value=r["label"])} class="text">{method}</td>',
            f"<td{attrs(data_value='' if n is None else n)}>{esc('–' if n is None else n)}</td>",
            *(_metric_cell(table, i, s.key, protocols[s.key]) for s in table.metrics),
        ]
        row_attrs = attrs(
            class_=classes or None, data_model=table.model, data_ratio=ratio_key(ratio), data_status=r["status"],
            data_order=i, data_group_start="1" if group_start else "0", data_href=href,
        )
        body.append(f"<tr{row_attrs}>" + "".join(cells) + "</tr>")
    return (
        f'<table class="leaderboard sortable"{attrs(data_model=table.model)}>'
        f"<thead><tr>{''.join(head)}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    )


def _notes(table: LeaderboardTable) -> str:
    """The table's notes (rules, marks, footnotes) as a list beneath it, as in the text formats."""
    if not table.notes:
        return ""
    return '<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in table.notes) + "</ul>"


def model_section(
    table: LeaderboardTable, pages: Mapping[str, str], figures: Sequence[Figure], anchor: str
) -> str:
    """One model: heading, the table's caption, the table with its notes beneath, and its figures beside it."""
    figs = "".join(
        f'<figure><a href="{esc(f.png)}"><img src="{esc(f.png)}" alt="{esc(f.caption)}" loading="lazy"></a>'
        f"<figcaption>{esc(f.caption)}"
        + (f' <a href="{esc(f.pdf)}">PDF</a>' if f.pdf else "")
        + "</figcaption></figure>"
        for f in figures
    )
    return (
        f'<section class="model"{attrs(id=anchor, data_model=table.model)}>'
        f"<h2>{esc(table.model)}</h2>"
        f'<p class="caption">{esc(table.caption.partition(": ")[2])}</p>'
        f'<div class="board"><div class="table-wrap">{_table(table, pages)}{_notes(table)}</div>'
        + (f'<aside class="figures">{figs}</aside>' if figs else "")
        + "</div></section>"
    )


def _options(select_id: str, label: str, every: str, values: Sequence[tuple[str, str]]) -> str:
    opts = [f'<option value="">{esc(every)}</option>'] + [
        f"<option{attrs(value=v)}>{esc(text)}</option>" for v, text in values
    ]
    return f'<label>{esc(label)} <select id="{esc(select_id)}">{"".join(opts)}</select></label>'


def controls(tables: Sequence[LeaderboardTable]) -> str:
    """The filter bar: model, protocol, ratio, and a button back to the default row order."""
    models = [(t.model, t.model) for t in tables]
    protocols = sorted({p for t in tables for ps in t.protocols.values() for p in ps})
    ratios = sorted({float(r) for t in tables for r, d in zip(t.rows["ratio"], t.rows["is_dense"], strict=True) if not d})
    return (
        '<section id="controls">'
        + _options("filter-model", "Model", "all models", models)
        + _options("filter-protocol", "Protocol", "all protocols", [(p, p) for p in protocols])
        + _options("filter-ratio", "Ratio", "all ratios", [(ratio_key(r), ratio_label(r)) for r in ratios])
        + '<button type="button" id="reset-order">default order</button>'
        + '<span id="shown-count" class="muted"></span>'
        + "</section>"
    )


def compare_section(result: CompareResult, baseline: str) -> str:
    """Regression verdicts against ``baseline`` (from :func:`harness.report.compare.compare`)."""
    t = result.table
    numeric = ("ratio", "baseline", "current", "rel_change")
    head = "".join(
        f"<th{attrs(data_type='num')}>{esc(c)}</th>" if c in numeric else f'<th data-type="text" class="text">{esc(c)}</th>'
        for c in t.columns
    )
    rows = []
    for order, (_, r) in enumerate(t.iterrows()):
        cells = []
        for c in t.columns:
            v = r[c]
            missing = v is None or (isinstance(v, float) and math.isnan(v))
            if c == "verdict":
                cells.append(f'<td class="text"{attrs(data_value=v)}><span class="verdict {esc(v)}">{esc(v)}</span></td>')
            elif c in numeric:
                text = "" if missing else (f"{v:+.2%}" if c == "rel_change" else f"{v:.6g}")
                cells.append(f"<td{attrs(data_value='' if missing else repr(float(v)))}>{esc(text)}</td>")
            else:
                cells.append(f'<td class="text"{attrs(data_value="" if missing else v)}>{esc("" if missing else v)}</td>')
        ratio = r.get("ratio")
        row_attrs = attrs(
            data_model=r.get("model"), data_order=order,
            data_ratio=None if ratio is None or pd.isna(ratio) else ratio_key(float(ratio)),
        )
        rows.append(f"<tr{row_attrs}>" + "".join(cells) + "</tr>")
    verdict = "worse" if result.exit_code else "ok"  # the summary's PASS/FAIL, coloured like a verdict
    return (
        '<section id="compare"><h2>Regression verdicts</h2>'
        f'<p>Against <code>{esc(baseline)}</code>: <span class="verdict {verdict}">{esc(result.summary())}</span>. '
        "A metric is worse when it moved against its direction by more than the relative tolerance; "
        "a baseline cell that is missing, failed or measured under another protocol fails too.</p>"
        f'<div class="table-wrap"><table class="sortable compare"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div></section>"
    )
