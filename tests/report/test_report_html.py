"""The static HTML leaderboard: page structure and escaping without a browser, then the shipped
reference results driven in headless Chromium (marker ``browser``)."""

from __future__ import annotations

import argparse
import copy
import html
import json
import os
import re
import time
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from report_fixtures import make_record, write_store

from harness.report.cli import add_report_subcommands
from harness.report.leaderboard import build_leaderboard
from harness.report.site.writer import write_site
from harness.report.store import load_store

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "results"  # reference leaderboard and ablations: three models, two protocols, some with two seeds
HOSTILE = '<script>alert("x")</script>&'


class _Page(HTMLParser):
    """Collects what the checks need: links, tags with their attributes, and the text."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        for key in ("href", "src"):
            if a.get(key):
                self.links.append(str(a[key]))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def _rows(page: _Page) -> list[dict[str, str | None]]:
    return [a for tag, a in page.tags if tag == "tr" and "data-status" in a]


def _store(tmp_path: Path) -> Path:
    """Ties, a failed cell, a stale cell, a smoke record and a hostile method name."""
    recs = [make_record("dense", 0.0)]
    recs += [make_record("svd-llm", 0.4, s, metrics__wikitext2__ppl=v) for s, v in enumerate([10.0, 10.4, 10.8])]
    recs.append(make_record("adasvd", 0.4, 0, metrics__wikitext2__ppl=10.1))
    failed = make_record("ressvd", 0.4, status="failed", error=f"Traceback\nRuntimeError: {HOSTILE}")
    failed["metrics"] = {}
    stale = make_record("svd", 0.4, run_key="old-svd", metrics__wikitext2__ppl=1.0)
    stale["method"]["config"]["factorizer"] = {"name": "plain", "retired": True}
    smoke = make_record("svd-llm", 0.6, limit=10, metrics__wikitext2__ppl=99.0)
    results = write_store(tmp_path / "results", [*recs, failed, stale, smoke])
    # A run key is user input too: this one must not lead the site's page outside records/.
    evil = make_record(HOSTILE, 0.4, 0, run_key="../../evil key", metrics__wikitext2__ppl=30.0)
    (results / "evil.json").write_text(json.dumps(evil))
    return results


def test_site_structure_escaping_and_local_links(tmp_path: Path) -> None:
    results = _store(tmp_path)
    index = write_site(results, tmp_path / "site", metrics=["wikitext2"], figures=False)
    site = index.parent
    raw = index.read_text(encoding="utf-8")
    assert HOSTILE not in raw and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&amp;" in raw
    pages = [index, *sorted((site / "records").glob("*.html"))]
    assert len(pages) == 1 + 8  # every record but the smoke one has a page
    for path in pages:
        text = path.read_text(encoding="utf-8")
        assert "<script>alert" not in text and "RuntimeError: <script" not in text
        page = _parse(path)
        for link in page.links:
            # Self-contained: no external URL, no absolute path, and every local target exists.
            assert "://" not in link and not link.startswith(("/", "//")), (path.name, link)
            if not link.startswith(("data:", "#")):
                assert (path.parent / link).resolve().exists(), (path.name, link)
    assert (site / "records" / "evil_key.html").exists()  # a record's run key never escapes records/
    page = _parse(index)
    rows = _rows(page)
    by_label = {}
    for tag, a in page.tags:
        if tag == "td" and a.get("class") == "text" and a.get("data-value"):
            by_label[a["data-value"]] = a
    statuses = sorted(r["data-status"] for r in rows)
    assert statuses == ["failed", "ok", "ok", "ok", "ok", "stale"]
    text = "".join(page.text)
    assert "1 smoke record(s)" in text and "99.00" not in text  # left out, and said so
    assert "10.40 ± 0.40" in text and "10.10" in text and "1.00" not in text  # stale numbers never shown
    # The tie (10.40 ± 0.40 reaches 10.10) is marked on both entries, the same rule as the Markdown table.
    tie_cells = [a for tag, a in page.tags if tag == "td" and a.get("class") == "best tie"]
    assert len(tie_cells) == 2
    assert {r["data-ratio"] for r in rows} == {"0", "0.4"}


def test_site_matches_the_table_builder_and_includes_smoke_when_asked(tmp_path: Path) -> None:
    results = _store(tmp_path)
    index = write_site(results, tmp_path / "site", metrics=["wikitext2"], figures=False, allow_limited=True)
    rows = _rows(_parse(index))
    (table,) = build_leaderboard(
        load_store(results, include_failed=True), metrics=["wikitext2"], allow_limited=True, include_unusable=True
    )
    assert [r["data-status"] for r in rows] == list(table.rows["status"])
    assert "SVD-LLM (limit 10)†" in index.read_text(encoding="utf-8")
    detail = next(p for p in (index.parent / "records").glob("*.html") if "RuntimeError" in p.read_text())
    text = detail.read_text(encoding="utf-8")
    assert "This run failed; it has no results" in text and "No metrics in this record" in text


def test_detail_page_has_config_calibration_layers_provenance(tmp_path: Path) -> None:
    rec = make_record("svd-llm", 0.4)
    index = write_site(write_store(tmp_path / "r", [make_record("dense", 0.0), rec]), tmp_path / "site", figures=False)
    page = index.parent / "records" / f"{rec['run_key']}.html"
    parsed = _parse(page)
    text = "".join(parsed.text)
    for heading in ("Method config", "Calibration", "Per-layer ranks, keeps and errors (56 layers)", "Provenance", "Metrics"):
        assert heading in text
    layer_rows = [a for tag, a in parsed.tags if tag == "tr" and "data-order" in a]
    assert len(layer_rows) >= len(rec["layers"])
    assert "f00dfeed" in text and "file:/data/wikitext2/train.txt" in text and "wikitext2@2048" in text
    embedded = re.search(r'<pre class="record">(.*?)</pre>', page.read_text(encoding="utf-8"), re.S)
    stored = json.loads(html.unescape(embedded.group(1)))
    assert stored["run_key"] == rec["run_key"] and stored["layers"] == rec["layers"]
    assert not list(index.parent.rglob("*.json"))  # nothing a later read of the results would take for a record


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="svdbench")
    add_report_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_html_with_figures_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recs = [make_record("dense", 0.0), make_record("svd", 0.4), make_record("svd-llm", 0.4)]
    base = write_store(tmp_path / "base", recs)
    worse = copy.deepcopy(recs[2])
    worse["metrics"]["wikitext2"]["ppl"] *= 1.1
    cur = write_store(tmp_path / "cur", [recs[0], recs[1], worse])
    out = tmp_path / "site"
    assert _run(["leaderboard", str(cur), "--format", "html"]) == 2  # a site needs --out
    assert _run(["leaderboard", str(cur), "--format", "html", "--out", str(out), "--metrics", "wikitext2",
                 "--compare", str(base)]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip() == str(out / "index.html")
    page = _parse(out / "index.html")
    images = [a["src"] for tag, a in page.tags if tag == "img"]
    assert any(s.startswith("figures/ppl-vs-ratio_wikitext2_") for s in images)
    assert any(s.startswith("figures/rank-allocation_") for s in images)
    text = "".join(page.text)
    assert "Regression verdicts" in text and "FAIL" in text and "+10.00%" in text


# --- in a real browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chrome(tmp_path_factory: pytest.TempPathFactory) -> Any:
    pytest.importorskip("selenium", reason="selenium is not installed: pip install -e '.[browser]'")
    from browser_driver import ensure_browser, start_chrome

    t0 = time.monotonic()
    found, why = ensure_browser()
    if found is None:
        pytest.skip(why)
    driver = start_chrome(*found, tmp_path_factory.mktemp("chromium-profile"))
    print(f"headless Chromium ready in {time.monotonic() - t0:.1f} s")  # visible with -s: includes any apt install
    yield driver
    driver.quit()


def _screenshot_dir(tmp_path: Path) -> Path:
    """``SVDBENCH_SCREENSHOTS=1`` keeps them in results/html-screenshots/, another value names the folder."""
    wanted = os.environ.get("SVDBENCH_SCREENSHOTS", "")
    folder = (ROOT / "results" / "html-screenshots") if wanted in ("1", "true", "yes") else Path(wanted) if wanted else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _console_errors(driver: Any) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def _full_page_screenshot(driver: Any, path: Path) -> None:
    """The whole page, not only the window (DevTools captures beyond the viewport)."""
    import base64

    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    clip = {"x": 0, "y": 0, "width": size["width"], "height": min(size["height"], 12000), "scale": 1}
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": clip})
    path.write_bytes(base64.b64decode(shot["data"]))


@pytest.mark.browser
def test_shipped_results_site_in_headless_chromium(chrome: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    index = write_site(SHIPPED, tmp_path / "site")
    tables = build_leaderboard(load_store(SHIPPED), include_unusable=True)
    ppl = [t for t in tables if "wikitext2.ppl" in t.rows]
    assert len(ppl) >= 2 and len(tables) > len(ppl), "shipped results: two decoders (perplexity) and MiniLM"
    # first: a decoder with an SVD-LLM row at 0.4 (the row clicked below); second: another decoder with
    # rows at 0.4 (the ratio filter below).
    first = next(t for t in ppl if ((t.rows["ratio"] == 0.4) & t.rows["label"].str.fullmatch(r"SVD-LLM( \(.*\))?")).any())
    second = next(t for t in ppl if t is not first and (t.rows["ratio"] == 0.4).any())
    encoder = next(t for t in tables if t not in ppl)
    shots = _screenshot_dir(tmp_path)
    chrome.get(index.as_uri())
    WebDriverWait(chrome, 20).until(lambda d: d.find_element(By.ID, "shown-count").text != "")

    def section(model: str) -> Any:
        return chrome.find_element(By.CSS_SELECTOR, f'section.model[data-model="{model}"]')

    def body_rows(model: str) -> list[Any]:
        return section(model).find_elements(By.CSS_SELECTOR, "table.leaderboard tbody tr")

    def cell(row: Any, i: int) -> str:
        return row.find_elements(By.TAG_NAME, "td")[i].get_attribute("data-value")

    # Sorting by a metric: better first (perplexity ascending), the dense reference pinned on top,
    # equal values in the default order: exactly the table builder's rows sorted by their means.
    th = section(first.model).find_element(By.CSS_SELECTOR, 'th[data-key="wikitext2.ppl"]')
    th.click()
    assert th.get_attribute("aria-sort") == "ascending"
    rows = body_rows(first.model)
    assert "pinned" in rows[0].get_attribute("class") and cell(rows[0], 1) == "Original"
    others = first.rows[~first.rows["is_dense"]].sort_values("wikitext2.ppl", kind="stable")
    assert [(r.get_attribute("data-ratio"), cell(r, 1)) for r in rows[1:]] == [
        (f"{r:g}", label) for r, label in zip(others["ratio"], others["label"], strict=True)
    ]
    th.click()
    texts = [cell(r, 3) for r in body_rows(first.model)[1:]]
    values = [float(t) for t in texts if t]  # rows without the metric (e.g. efficiency records) sort last
    assert th.get_attribute("aria-sort") == "descending" and values == sorted(values, reverse=True)
    assert texts == [str(t) for t in texts if t] + [t for t in texts if not t]
    chrome.find_element(By.ID, "reset-order").click()
    assert [int(r.get_attribute("data-order")) for r in body_rows(first.model)] == list(range(len(first.rows)))

    # Filters: a model hides the others; a ratio keeps that ratio's rows and the dense reference;
    # a protocol keeps the models measured under it.
    Select(chrome.find_element(By.ID, "filter-model")).select_by_value(second.model)
    assert section(second.model).is_displayed()
    assert not section(first.model).is_displayed() and not section(encoder.model).is_displayed()
    Select(chrome.find_element(By.ID, "filter-ratio")).select_by_value("0.4")
    visible = [r for r in body_rows(second.model) if r.is_displayed()]
    at_04 = int((~second.rows["is_dense"] & (second.rows["ratio"] == 0.4)).sum())
    assert len(visible) == 1 + at_04 and {r.get_attribute("data-ratio") for r in visible[1:]} == {"0.4"}
    Select(chrome.find_element(By.ID, "filter-model")).select_by_value("")
    Select(chrome.find_element(By.ID, "filter-ratio")).select_by_value("")
    Select(chrome.find_element(By.ID, "filter-protocol")).select_by_value(encoder.protocols[encoder.metrics[0].key][0])
    assert section(encoder.model).is_displayed() and not section(first.model).is_displayed()
    Select(chrome.find_element(By.ID, "filter-protocol")).select_by_value("")
    assert all(section(t.model).is_displayed() for t in tables)
    _full_page_screenshot(chrome, shots / "leaderboard.png")
    assert _console_errors(chrome) == []

    # A click on a row opens its record's page.
    # (SVD-LLM rows carry their calibration in the label when a model has several, e.g. efficiency records.)
    row = next(r for r in body_rows(first.model) if r.get_attribute("data-ratio") == "0.4"
               and re.fullmatch(r"SVD-LLM( \(.*\))?", cell(r, 1)))
    label = cell(row, 1)
    target = row.get_attribute("data-href")
    row.find_elements(By.TAG_NAME, "td")[3].click()  # anywhere on the row, not only on the link
    WebDriverWait(chrome, 20).until(lambda d: d.current_url.endswith(target))
    i = first.rows.index[(first.rows["label"] == label) & (first.rows["ratio"] == 0.4)][0]
    source = next(m["source_file"] for m in first.rows.at[i, "members"] if m["status"] == "ok")
    record = json.loads(Path(source).read_text())
    assert "SVD-LLM at 40%" in chrome.find_element(By.TAG_NAME, "h1").text
    assert len(chrome.find_elements(By.CSS_SELECTOR, "table.layers tbody tr")) == len(record["layers"]) > 0
    sha = record["provenance"].get("git_sha")  # None for records made outside a git checkout
    assert "Provenance" in chrome.page_source and (sha is None or sha in chrome.page_source)
    _full_page_screenshot(chrome, shots / "detail.png")
    assert _console_errors(chrome) == []
    for name in ("leaderboard.png", "detail.png"):
        assert (shots / name).stat().st_size > 10_000
    print(f"screenshots: {shots / 'leaderboard.png'} {shots / 'detail.png'}")
