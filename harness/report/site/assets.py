"""The static site's stylesheet and script, written next to the pages (no CDN, no network at view time).

Kept as Python strings rather than package data files so that any install of the package (wheel
or editable) carries them. The script is plain ES2017 with no dependencies; it works from
``file://`` URLs, where browsers block fetching JSON, so every datum it needs is in the page's
``data-*`` attributes.

Script contract with the pages (:mod:`harness.report.site.sections`, :mod:`harness.report.site.record_page`):

* ``table.sortable``: clicking a ``th`` sorts the ``tbody`` rows by the cells' ``data-value``
  (numbers when the ``th`` has ``data-type="num"``); empty values (failed, stale, missing) always
  sort last; ``data-first="desc"`` makes the first click descending (higher-is-better metrics);
  rows with class ``pinned`` (the dense reference) stay on top. The ``th`` gets ``aria-sort``.
* ``#filter-model`` / ``#filter-protocol`` / ``#filter-ratio``: hide ``[data-model]`` sections
  and rows of other models, metric cells (``[data-protocol]``) of other protocols, and rows of
  other ratios (pinned rows stay: the dense reference belongs to every ratio).
* ``tr[data-href]``: a click anywhere on the row opens the record's detail page.
* ``#reset-order``: back to the default order (dense, ratio groups, method order).
"""

from __future__ import annotations

__all__ = ["STYLE", "SCRIPT", "STYLE_FILE", "SCRIPT_FILE"]

STYLE_FILE = "assets/svdbench.css"
SCRIPT_FILE = "assets/svdbench.js"

STYLE = """\
:root { --fg: #1b1b1b; --muted: #5f6368; --line: #d9dce0; --head: #f3f4f6; --best: #fff6d6;
        --ok: #1e7b34; --bad: #b3261e; --warn: #8a5a00; --link: #0b57d0; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); }
header, main, footer { padding: 0 24px; }
header { border-bottom: 1px solid var(--line); padding-top: 12px; padding-bottom: 8px; }
h1 { font-size: 22px; margin: 4px 0; } h2 { font-size: 18px; margin: 20px 0 4px; } h3 { font-size: 15px; margin: 16px 0 4px; }
a { color: var(--link); text-decoration: none; } a:hover { text-decoration: underline; }
.muted, .caption, footer { color: var(--muted); }
.caption { max-width: 1100px; margin: 4px 0 8px; font-size: 13px; }
.notes { max-width: 1100px; margin: 6px 0 0; padding-left: 18px; font-size: 12px; color: var(--muted); white-space: normal; }
#controls { display: flex; flex-wrap: wrap; gap: 16px; align-items: center; padding: 10px 0; }
#controls label { display: flex; gap: 6px; align-items: center; }
select, button { font: inherit; padding: 2px 6px; }
.board { display: flex; flex-wrap: wrap; gap: 20px; align-items: flex-start; }
.table-wrap { overflow-x: auto; flex: 0 1 auto; max-width: 100%; }
.figures { flex: 1 1 420px; max-width: 640px; display: flex; flex-direction: column; gap: 12px; }
.figures img { width: 100%; height: auto; border: 1px solid var(--line); background: #fff; }
.figures figcaption { font-size: 12px; color: var(--muted); }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 10px; text-align: right; white-space: nowrap; }
th { background: var(--head); position: sticky; top: 0; }
th.text, td.text { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[aria-sort="ascending"]::after { content: " \\25B2"; font-size: 10px; }
table.sortable th[aria-sort="descending"]::after { content: " \\25BC"; font-size: 10px; }
tr.group-start td { border-top: 2px solid #9aa0a6; }
tr.pinned td { background: #fafafa; }
tr[data-href] { cursor: pointer; } tr[data-href]:hover td { background: #eef3fd; }
td.best { font-weight: 700; background: var(--best); }
td.tie sup { color: var(--warn); }
.seeds { font-size: 12px; color: var(--muted); margin-left: 6px; }
.status { display: inline-block; padding: 0 6px; border-radius: 8px; font-size: 12px; font-weight: 600; }
.status.ok, .verdict.ok, .verdict.better { color: var(--ok); }
.status.failed, .status.stale, .verdict.worse, .verdict.missing { color: #fff; background: var(--bad); }
.status.stale { background: var(--warn); }
.status.smoke { color: #fff; background: #6b4fbb; }
.verdict { font-weight: 700; }
.note { color: var(--warn); cursor: help; }
.hidden, .hidden-col { display: none !important; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 16px; margin: 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; word-break: break-all; }
pre { background: #f7f7f8; border: 1px solid var(--line); padding: 8px; overflow-x: auto; max-width: 1100px; }
.notice { border-left: 4px solid var(--warn); background: #fff8e6; padding: 6px 10px; max-width: 1100px; }
.notice.error { border-color: var(--bad); background: #fdecea; }
"""

SCRIPT = """\
(function () {
  "use strict";

  function cellValue(row, index) {
    var cell = row.cells[index];
    return cell ? (cell.getAttribute("data-value") || "") : "";
  }

  function compare(a, b, numeric) {
    if (a === "" || b === "") { return a === b ? 0 : (a === "" ? 1 : -1); }
    if (numeric) { return parseFloat(a) - parseFloat(b); }
    return a.localeCompare(b);
  }

  function sortBy(table, th) {
    var index = th.cellIndex;
    var numeric = th.getAttribute("data-type") === "num";
    var current = th.getAttribute("aria-sort");
    var first = th.getAttribute("data-first") === "desc" ? "descending" : "ascending";
    var order = current === first ? (first === "ascending" ? "descending" : "ascending") : first;
    var sign = order === "ascending" ? 1 : -1;
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var pinned = rows.filter(function (r) { return r.classList.contains("pinned"); });
    var rest = rows.filter(function (r) { return !r.classList.contains("pinned"); });
    rest.sort(function (r1, r2) {
      var a = cellValue(r1, index), b = cellValue(r2, index);
      if (a === "" || b === "") { return compare(a, b, numeric); }  // empty cells last either way
      var c = sign * compare(a, b, numeric);
      return c !== 0 ? c : parseInt(r1.getAttribute("data-order"), 10) - parseInt(r2.getAttribute("data-order"), 10);
    });
    pinned.concat(rest).forEach(function (r) { body.appendChild(r); r.classList.remove("group-start"); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", order);
  }

  function defaultOrder(table) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r1, r2) {
      return parseInt(r1.getAttribute("data-order"), 10) - parseInt(r2.getAttribute("data-order"), 10);
    });
    rows.forEach(function (r) {
      body.appendChild(r);
      if (r.getAttribute("data-group-start") === "1") { r.classList.add("group-start"); }
    });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (h) { h.removeAttribute("aria-sort"); });
  }

  function selected(id) {
    var el = document.getElementById(id);
    return el ? el.value : "";
  }

  function applyFilters() {
    var model = selected("filter-model"), protocol = selected("filter-protocol"), ratio = selected("filter-ratio");
    document.querySelectorAll("[data-model]").forEach(function (el) {
      var hide = model !== "" && el.getAttribute("data-model") !== model;
      if (!hide && ratio !== "" && el.tagName === "TR" && el.hasAttribute("data-ratio") && !el.classList.contains("pinned")) {
        hide = el.getAttribute("data-ratio") !== ratio;
      }
      el.classList.toggle("hidden", hide);
    });
    document.querySelectorAll("[data-protocol]").forEach(function (el) {
      el.classList.toggle("hidden-col", protocol !== "" && el.getAttribute("data-protocol") !== protocol);
    });
    document.querySelectorAll("section.model").forEach(function (section) {
      if (protocol === "" || section.classList.contains("hidden")) { return; }
      var shown = section.querySelectorAll("th[data-protocol]:not(.hidden-col)").length;
      section.classList.toggle("hidden", shown === 0);
    });
    var count = document.getElementById("shown-count");
    if (count) {
      var rows = document.querySelectorAll("table.leaderboard tbody tr");
      var visible = Array.prototype.filter.call(rows, function (r) { return r.offsetParent !== null; }).length;
      count.textContent = visible + " of " + rows.length + " rows shown";
    }
  }

  function init() {
    document.querySelectorAll("table.sortable").forEach(function (table) {
      Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
        th.addEventListener("click", function () { sortBy(table, th); });
      });
    });
    document.querySelectorAll("tr[data-href]").forEach(function (row) {
      row.addEventListener("click", function (event) {
        if (event.target.closest("a")) { return; }  // a link inside the row goes where it points
        window.location.href = row.getAttribute("data-href");
      });
    });
    ["filter-model", "filter-protocol", "filter-ratio"].forEach(function (id) {
      var el = document.getElementById(id);
      if (el) { el.addEventListener("change", applyFilters); }
    });
    var reset = document.getElementById("reset-order");
    if (reset) {
      reset.addEventListener("click", function () {
        document.querySelectorAll("table.sortable").forEach(defaultOrder);
      });
    }
    applyFilters();
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", init);
  } else {
    init();
  }
})();
"""
