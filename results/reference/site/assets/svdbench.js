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
