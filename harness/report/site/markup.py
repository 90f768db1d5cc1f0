"""Shared pieces of the static site's pages: escaping, the page skeleton, fact lists and plain tables.

Every string that comes from a record (model, method, config, paths, errors) goes through
:func:`esc` before it reaches a page; page code never formats raw record text into HTML.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from harness.report.site.assets import SCRIPT_FILE, STYLE_FILE

__all__ = ["esc", "attrs", "page", "facts", "plain_table", "number_text", "json_block"]


def esc(value: Any) -> str:
    """HTML-escape any value's text (quotes included, so it is safe inside attributes too)."""
    return html.escape("" if value is None else str(value), quote=True)


def attrs(**values: Any) -> str:
    """``key="value"`` pairs for a tag (``data_x`` -> ``data-x``, ``class_`` -> ``class``); None values are left out."""
    return "".join(f' {k.rstrip("_").replace("_", "-")}="{esc(v)}"' for k, v in values.items() if v is not None)


def page(title: str, body: str, depth: int = 0) -> str:
    """A complete HTML document around ``body``; ``depth`` is the page's folder depth below the site root.

    The stylesheet and script are the site's own files (relative links). The empty data-URL icon
    stops browsers from requesting a favicon that does not exist.
    """
    up = "../" * depth
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<link rel="icon" href="data:,">\n'
        f"<title>{esc(title)}</title>\n"
        f'<link rel="stylesheet" href="{up}{STYLE_FILE}">\n'
        f'<script src="{up}{SCRIPT_FILE}" defer></script>\n'
        f"</head>\n<body>\n{body}\n</body>\n</html>\n"
    )


def number_text(value: Any) -> str:
    """Readable text of a record value: floats to 6 significant digits, everything else as is."""
    if isinstance(value, bool) or value is None:
        return "–" if value is None else str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.6g}"
    if isinstance(value, int):
        return f"{value:,d}" if abs(value) >= 10_000 else str(value)
    return str(value)


def facts(items: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> str:
    """A ``<dl>`` of label/value pairs (values escaped; dicts and lists as compact JSON)."""
    pairs = items.items() if isinstance(items, Mapping) else items
    out = []
    for label, value in pairs:
        text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else number_text(value)
        out.append(f"<dt>{esc(label)}</dt><dd>{esc(text)}</dd>")
    return '<dl class="facts">' + "".join(out) + "</dl>"


def plain_table(
    headers: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[bool] | None = None, cls: str = "sortable"
) -> str:
    """A sortable table of record values (escaped); ``numeric`` says which columns sort as numbers."""
    numeric = list(numeric) if numeric is not None else [False] * len(headers)
    head = "".join(
        f"<th{attrs(data_type='num' if n else 'text', class_=None if n else 'text')}>{esc(h)}</th>"
        for h, n in zip(headers, numeric, strict=True)
    )
    body = []
    for order, row in enumerate(rows):
        cells = []
        for value, n in zip(row, numeric, strict=True):
            sort_value = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
            cls_attr = "" if n else ' class="text"'
            cells.append(f"<td{attrs(data_value=sort_value)}{cls_attr}>{esc(number_text(value))}</td>")
        body.append(f'<tr data-order="{order}">' + "".join(cells) + "</tr>")
    return f'<table class="{esc(cls)}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def json_block(value: Any) -> str:
    """Pretty JSON in a ``<pre>`` (escaped)."""
    return f"<pre>{esc(json.dumps(value, indent=2, sort_keys=True, default=str))}</pre>"
