"""`featurekit serve` driven in a real browser (Playwright + Debian's Chromium): list → search → feature page →
hover a highlighted token → try a text → steer → switch runs, and the XSS corpus rendering as text with no
dialog. Skipped, naming the package, where Chromium or Playwright is missing."""

from __future__ import annotations

import os
import re
from urllib.parse import quote

import pytest

from .conftest import XSS

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"browser tests need Chromium at {CHROMIUM}: apt-get install chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("browser tests need Playwright: pip install playwright")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Page:
    """A fresh browser page that records dialogs (alert, confirm, …) and console errors (CSP violations)."""

    def __init__(self, browser, base: str) -> None:
        self.context = browser.new_context(viewport={"width": 1300, "height": 900})
        self.page = self.context.new_page()
        self.page.set_default_timeout(60_000)
        self.base, self.dialogs, self.errors = base, [], []
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def goto(self, path: str):
        return self.page.goto(self.base + path)

    def check_clean(self) -> None:
        assert not self.dialogs, f"a dialog fired: {self.dialogs}"
        assert not [e for e in self.errors if "Content Security Policy" in e or "Refused" in e], self.errors


@pytest.fixture
def page(browser, server):
    p = Page(browser, server.url)
    yield p
    p.context.close()


def test_list_search_feature_page_and_hover(page):
    p = page.page
    page.goto("/r/topk/features")
    assert p.locator("table.flist tbody tr").count() > 10
    p.select_option("select[name=sort]", "max")
    p.click("form.controls button")
    p.wait_for_url(re.compile(r"sort=max"))
    values = [float(v) for v in p.locator("table.flist tbody tr td:nth-child(5)").all_inner_texts()]
    assert values == sorted(values, reverse=True)
    p.fill("header input[name=q]", "cat")
    p.press("header input[name=q]", "Enter")
    p.wait_for_url(re.compile(r"/r/topk/search\?q=cat"))
    first = p.locator("section table a.flink").first
    fid = first.inner_text().lstrip("#")
    first.click()
    p.wait_for_url(re.compile(rf"/r/topk/f/{fid}$"))
    assert p.locator("h1").inner_text().startswith(f"Feature #{fid}")
    assert p.locator(".group#top .ex").count() > 0 and p.locator("svg.chart").count() >= 1
    peak = p.locator(".group#top .ex .t.pk").first
    value = peak.get_attribute("data-v")
    peak.hover()
    tip = p.locator("#tip")
    tip.wait_for(state="visible")
    assert f"act {value}" in tip.inner_text() and float(value) > 0
    row = p.locator(".group#top .ex").first
    hidden = row.locator(".t.far")
    if hidden.count():
        assert not hidden.first.is_visible()
        row.click()
        assert hidden.first.is_visible()
    p.locator("aside a.flink").first.click()  # a co-firing / neighbour feature
    p.wait_for_url(re.compile(r"/r/\w+/f/\d+$"))
    page.check_clean()


def test_try_a_text(page):
    p = page.page
    page.goto("/r/topk/try")
    p.fill("textarea[name=text]", "the big cat sat on the red mat " + XSS[0])
    p.click("form.tryform button")
    p.wait_for_selector("#trytext")
    tokens = p.locator("#trytext .tk")
    assert XSS[0] in p.locator("#trytext").inner_text()
    assert tokens.count() == 17
    tokens.nth(2).click()  # "big"
    panel = p.locator("#tf-2")
    assert panel.is_visible() and "big" in panel.inner_text()
    assert p.locator("#tf-3").is_hidden()
    p.locator("tr.pick").first.click()
    assert p.locator("#trytext .tk[class*=' p'], #trytext .tk[class*=' n']").count() > 0  # shaded by the feature
    link = panel.locator("a.flink").first
    fid = link.inner_text().lstrip("#")
    link.click()
    p.wait_for_url(re.compile(rf"/r/topk/f/{fid}$"))
    page.check_clean()


def test_steer(page, server):
    p = page.page
    page.goto("/r/topk/f/3")
    p.click("text=Steer with it")
    p.wait_for_url(re.compile(r"/r/topk/steer\?"))
    assert p.input_value("input[name=f0]") == "3"
    p.fill("textarea[name=prompt]", "the cat sat on")
    p.fill("input[name=s0]", "8")
    p.fill("input[name=n]", "8")
    p.click("form.steerform button")
    p.wait_for_selector("#steered")
    plain, steered = p.locator("#plain .cont").inner_text(), p.locator("#steered .cont").inner_text()
    assert plain.strip() and steered.strip() and plain != steered
    page.check_clean()


def test_switch_runs(page):
    p = page.page
    page.goto("/r/topk/features")
    p.click(".runbar a.runchip:has-text('abstopk')")
    p.wait_for_url(re.compile(r"/r/abstopk/features$"))
    assert "abstopk" in p.locator(".runchip.on").inner_text()
    page.goto("/r/topk/f/0")
    link = p.locator("section.other:has-text('abstopk') a.flink").first
    fid = link.inner_text().lstrip("#")
    link.click()
    p.wait_for_url(re.compile(rf"/r/abstopk/f/{fid}$"))
    assert p.locator("text=Most negative activations").count() + p.locator("text=never fired").count() >= 1
    page.goto("/")
    assert p.locator("table.grid tbody tr").count() == 6
    page.check_clean()


def test_xss_corpus_renders_as_text(page):
    p = page.page
    for x in XSS[:3]:
        page.goto("/r/topk/search?q=" + quote(x, safe="") + "&by=token")
        assert x in p.locator("main h2").first.inner_text()
        link = p.locator("section table a.flink").first
        link.click()
        p.wait_for_url(re.compile(r"/r/topk/f/\d+$"))
        assert x in p.locator("main").text_content()  # examples (hidden far tokens too) and token chips
        assert p.locator("main img").count() == 0 and p.locator("script").count() == 1 and p.locator("main b").count() == 0
    page.goto("/r/topk/try")
    p.fill("textarea[name=text]", " ".join(XSS) + " Привет 日本語 مرحبا")
    p.click("form.tryform button")
    p.wait_for_selector("#trytext")
    assert all(x in p.locator("#trytext").inner_text() for x in XSS) and "{{7*7}}" in p.locator("#trytext").inner_text()
    assert "مرحبا" in p.locator("#trytext").inner_text()
    assert p.locator("main img").count() == 0 and p.locator("script").count() == 1
    page.goto("/r/topk/f/" + quote(XSS[0], safe=""))
    assert XSS[0] in p.locator(".error .msg").inner_text()
    page.check_clean()


def test_graph_viewer(page):
    """Hover a feature node (its details, top tokens from the run's store), prune edges and nodes with the sliders,
    pin a node, clamp it and read the new top logits, then open its feature page from the pinned list."""
    p = page.page
    page.goto("/g/tiny/")
    edges, nodes = p.locator("#graph line.e"), p.locator("#graph .nd")
    n_edges, n_nodes = edges.count(), nodes.count()
    assert n_edges > 10 and XSS[0] in p.locator(".gprompt").inner_text() and XSS[0][:12] in p.locator("#graph").text_content()
    feature = p.locator('#graph .nd.feat[data-run="transcoder"]').first
    fid, latent = feature.get_attribute("data-id"), feature.get_attribute("data-latent")
    feature.hover()
    tip = p.locator("#tip")
    tip.wait_for(state="visible")
    assert f"feature L1 #{latent}" in tip.inner_text() and "top tokens:" in tip.inner_text() and "activation" in tip.inner_text()
    assert p.locator("#graph line.e.hl").count() > 0  # its edges highlighted

    def set_slider(sel: str, value: float) -> None:
        p.eval_on_selector(sel, "(el, v) => { el.value = v; el.dispatchEvent(new Event('input')); }", value)

    set_slider("#g-edge", 0.5)
    hidden = p.locator("#graph line.e.off").count()
    assert 0 < hidden < n_edges and not p.locator("#graph line.e.off").first.is_visible()
    assert f"{n_edges - hidden} of {n_edges} edges" in p.locator("#g-count").inner_text()
    set_slider("#g-edge", 0)
    set_slider("#g-node", 0.5)
    assert 0 < p.locator("#graph .nd.off").count() < n_nodes and p.locator("#graph line.e.off").count() > 0
    set_slider("#g-node", 1)
    assert p.locator("#graph .nd.off").count() == 0 and p.locator("#graph line.e.off").count() == 0

    feature.click()
    assert "pin" in feature.get_attribute("class")
    pinned = p.locator("#g-pinned li")
    assert pinned.count() == 1 and f"feature L1 #{latent}" in pinned.first.inner_text()
    assert p.input_value("#g-int-node") == fid
    p.fill("#g-int-value", "500")
    p.click("#g-int button[type=submit]")
    p.wait_for_selector("#g-int-out table")
    assert p.locator("#g-int-out table").count() == 2 and p.locator("#g-int-out table").first.locator("tbody tr").count() == 10
    assert f"{fid} set to 500" in p.locator("#g-int-msg").inner_text()
    p.fill("#g-int-node", "err_0_0")
    p.click("#g-int button[type=submit]")
    p.wait_for_selector("#g-int-msg.bad")
    assert "error:" in p.locator("#g-int-msg").inner_text() and p.locator("#g-int-out table").count() == 0
    pinned.first.locator("a.flink").click()
    p.wait_for_url(re.compile(rf"/r/transcoder/f/{latent}$"))
    page.check_clean()


def test_graph_viewer_without_edges(page):
    p = page.page
    page.goto("/g/bare/")
    assert p.locator("#graph line.e").count() == 0 and "no kept edges" in p.locator("main").inner_text()
    unknown = p.locator('#graph .nd[data-id="1_999_2"]')
    unknown.hover()
    p.locator("#tip").wait_for(state="visible")
    assert "no feature page" in p.locator("#tip").inner_text()
    unknown.click()
    p.click("#g-int button[type=submit]")
    p.wait_for_selector("#g-int-msg.bad")
    assert "not a feature of the graph's transcoders" in p.locator("#g-int-msg").inner_text()
    page.check_clean()
