"""`featurekit serve` on a vision run: a tiny random DINOv2 run over random images (as in tests/vision), served
by a real subprocess; CLS-token and patch features apart on the overview, crops and heat-maps drawn on
request as PNGs, text pages refused by name, file names escaped, nothing written into the run folder."""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ..vision.tiny_vit import write_tiny_vit
from .conftest import snapshot, start_serve, stop

EVIL = '<img src=x onerror=alert(1)>'
LOADED = "imgs => imgs.every(i => i.complete && i.naturalWidth > 0)"  # every picture arrived and decoded


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory) -> Path:
    from featurekit.config import load_config
    from featurekit.pipeline import run_all

    root = tmp_path_factory.mktemp("vision_app")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        name = f"{EVIL}{i}.png" if i % 2 else f"p{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 40 + 4 * i, 3), dtype=np.uint8)).save(photos / name)
    model = write_tiny_vit(root, "dinov2")
    run_all(load_config(None, [
        f"model.name={model}", f"data.source={photos}", "model.dtype=float32", f"out_dir={root}", "name=vis",
        "site=resid_post.1", "data.train_tokens=1700", "data.harvest_batch=8", "data.shard_tokens=1000",
        "dictionary.method=topk", "dictionary.k=8", "dictionary.n_latents=64", "train.batch_size=128", "train.epochs=2",
        "train.buffer_tokens=512", "train.warmup_steps=2", "train.threads=1", "eval.tokens=340", "eval.splice_contexts=4",
        "eval.batch_contexts=4", "report.n_features=8", "images.scale_min=0.5", "features.tokens=680",
        "features.batch_contexts=8", "features.top_n=8"]), progress=False)  # the store: 40 views, the evaluation's 20 and 20 more
    return root / "vis"


@pytest.fixture(scope="module")
def vision_server(vision_run):
    before = snapshot(vision_run)
    proc, url, lines = start_serve(str(vision_run))
    yield url, before, lines
    stop(proc)


def get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.status, r.headers.get("content-type", ""), r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("content-type", ""), err.read()


def test_overview_lists_cls_and_patch_features_apart(vision_run, vision_server):
    url = vision_server[0]
    status, _, body = get(url + "/r/vis/")
    page = body.decode()
    assert status == 200 and ("CLS-token features" in page or "Patch features" in page)
    kinds = json.loads((vision_run / "features" / "token_kinds.json").read_text())
    tops = json.loads((vision_run / "features" / "top_patches.json").read_text())
    for f in tops:  # every kept latent is linked, under the heading of the token kind it fires on most
        i = f["latent"]
        c, p = kinds["cls_fires"][i], kinds["patch_fires"][i]
        kind = "dead" if c + p == 0 else "cls" if c > p else "patch"
        section = re.search(rf'<section class="vision-{kind}">(.*?)</section>', page, re.S)
        assert section and f'/r/vis/f/{i}"' in section.group(1)
    assert "CLS cosine" in page and "Try a text" not in page


def test_feature_page_crops_and_heat_maps_are_pngs(vision_run, vision_server):
    url, before, _ = vision_server
    tops = json.loads((vision_run / "features" / "top_patches.json").read_text())
    feature = max((f for f in tops if f["top"] and f["top"][0]["kind"] == "patch"), key=lambda f: len(f["top"]))
    status, _, body = get(f"{url}/r/vis/f/{feature['latent']}")
    page = body.decode()
    assert status == 200 and EVIL not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    srcs = re.findall(r'<img class="(crop|heat)" src="([^"]+)"', page)
    from featurekit.app.vision import VisionRun

    feature = VisionRun(0, "vis", vision_run).feature(feature["latent"])  # the store's top examples (more views)
    assert len(srcs) == 2 * len(feature["top"]) == 16
    for kind, src in srcs:
        status, ctype, png = get(url + src)
        assert status == 200 and ctype == "image/png"
        with Image.open(io.BytesIO(png)) as im:
            assert im.size == ((112, 112) if kind == "crop" else (224, 224))
    best = feature["top"][0]  # the feature's largest code: the hottest patch of its view's heat-map
    heat = next(src for kind, src in srcs if kind == "heat" and f"/heat/{best['view']}.png" in src)
    with Image.open(io.BytesIO(get(url + heat)[2])) as im:
        a = np.asarray(im.convert("RGB"), dtype=float)
    red = (a[..., 0] - (a[..., 1] + a[..., 2]) / 2).reshape(4, 56, 4, 56).mean(axis=(1, 3))  # per patch of the 4 × 4 grid
    assert np.unravel_index(red.argmax(), red.shape) == (best["row"], best["col"]) and red.max() > 100
    assert snapshot(vision_run) == before  # nothing written into the run folder


def test_vision_run_errors_are_clear(vision_run, vision_server):
    url = vision_server[0]
    status, _, body = get(url + "/r/vis/search?q=hello")
    assert status == 400 and "searched by id only" in body.decode()
    status, _, body = get(url + "/r/vis/try?text=hello")
    assert status == 400 and "no text pages" in body.decode()
    status, _, body = get(url + "/r/vis/f/9999")
    assert status == 404 and "does not exist" in body.decode()
    tops = json.loads((vision_run / "features" / "top_patches.json").read_text())
    latent = tops[0]["latent"]
    status, _, body = get(f"{url}/r/vis/f/{latent}/heat/9999.png")
    assert status == 404 and "not among" in body.decode()
    status, _, body = get(f"{url}/r/vis/f/{latent}/crop/99.png")
    assert status == 404 and "top examples" in body.decode()


def test_try_an_image_shows_the_top_features_and_a_heat_map(vision_run, vision_server):
    url = vision_server[0]
    status, _, body = get(url + "/r/vis/try-image")
    page = body.decode()
    assert status == 200 and page.count("<option") == 40 and EVIL not in page  # the store's views: 2 held-out images × 20
    status, _, body = get(url + "/r/vis/try-image?view=1")
    page = body.decode()
    rows = re.findall(r'try-image\?view=1&amp;feature=(\d+)">#\d+</a></td><td>([^<]+)</td><td>(CLS token|patch \(\d, \d\))', page)
    assert status == 200 and 8 <= len(rows) <= 10  # TopK k=8 on every token: at least 8 features fire; the top 10 shown
    values = [float(v) for _, v, _ in rows]
    assert values == sorted(values, reverse=True) and values[-1] > 0
    top = rows[0][0]
    assert f'/r/vis/view/1/{top}.png' in page
    status, ctype, png = get(f"{url}/r/vis/view/1/{top}.png")
    assert status == 200 and ctype == "image/png" and Image.open(io.BytesIO(png)).size == (224, 224)
    assert get(url + "/r/vis/try-image?view=999")[0] == 404
    status, _, body = get(url + "/r/vis/try-image?view=1&feature=9999")
    assert status == 400 and "does not exist" in body.decode()
    assert get(f"{url}/r/vis/view/1/9999.png")[0] == 404


def test_feature_page_in_a_browser(vision_run, vision_server, tmp_path):
    """Chromium loads the feature page's pictures (CSP allows them) with no dialog and no CSP error; then the try
    page. The screenshots land in tmp_path (docs/img/vision-explorer-*.png were taken this way)."""
    from .test_browser import ARGS, CHROMIUM, Page

    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"browser tests need Chromium at {CHROMIUM}: apt-get install chromium")
    sync_playwright = pytest.importorskip("playwright.sync_api", reason="browser tests need Playwright").sync_playwright
    from featurekit.app.vision import VisionRun

    tops = json.loads((vision_run / "features" / "top_patches.json").read_text())
    feature = VisionRun(0, "vis", vision_run).feature(max(tops, key=lambda f: len(f["top"]))["latent"])  # the store's tops
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = Page(browser, vision_server[0])
        try:
            page.goto(f"/r/vis/f/{feature['latent']}")
            assert page.page.locator("img[src]").evaluate_all(LOADED) and page.page.locator("img.heat").count() == len(feature["top"])
            page.page.screenshot(path=str(tmp_path / "vision-explorer-feature.png"), full_page=True)
            page.goto("/r/vis/features")  # the store's list, and the header's search by id
            assert page.page.locator("a.flink").count() > 0
            page.page.fill("header input[name=q]", str(feature["latent"]))
            with page.page.expect_navigation():
                page.page.click("header button[type=submit]")
            page.page.wait_for_load_state("load")
            assert page.page.url.endswith(f"/r/vis/f/{feature['latent']}")
            page.goto("/r/vis/try-image")
            page.page.select_option("select[name=view]", "1")
            with page.page.expect_navigation():
                page.page.click("form.tryform:not(#upload) button[type=submit]")
            page.page.wait_for_load_state("load")
            assert page.page.locator("img[src]").evaluate_all(LOADED) and "view=1" in page.page.url
            assert page.page.locator("img.vision-heat").count() == 1
            photo = tmp_path / "mine.png"
            Image.fromarray(np.random.default_rng(2).integers(0, 255, (36, 44, 3), dtype=np.uint8)).save(photo)
            page.page.set_input_files("input[type=file]", str(photo))
            page.page.click("#upload button[type=submit]")
            page.page.locator("#upload-result").wait_for(state="visible")
            assert page.page.locator("#upload-rows tr").count() >= 8
            assert "44 × 36" in page.page.locator("#upload-title").inner_text()
            assert page.page.locator("#upload-heat").evaluate("i => i.complete && i.naturalWidth") == 224
            page.page.screenshot(path=str(tmp_path / "vision-explorer-try.png"), full_page=True)
            page.check_clean()
        finally:
            page.context.close()
            browser.close()


def post(url: str, data: bytes, ctype: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST", headers={"content-type": ctype})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_upload_an_image(vision_server):
    url = vision_server[0] + "/r/vis/try-image/upload"
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8))
    for fmt, ctype in (("PNG", "image/png"), ("JPEG", "image/jpeg")):
        status, out = post(url, encoded(photo, fmt), ctype)
        assert status == 200 and out["size"] == [56, 40] and 8 <= len(out["top"]) <= 10
        assert out["feature"] == out["top"][0]["latent"] and out["heat"].startswith("data:image/png;base64,")
    status, out = post(url + "?feature=5", encoded(photo, "PNG"), "image/png")
    assert status == 200 and out["feature"] == 5
    status, out = post(url, b"GIF89a not an image", "image/png")
    assert status == 400 and "not a PNG or JPEG" in out["error"]
    status, out = post(url, encoded(photo, "GIF"), "image/png")  # a real GIF: refused, only PNG and JPEG are decoded
    assert status == 400 and "not a PNG or JPEG" in out["error"]
    status, out = post(url, encoded(photo, "PNG"), "text/plain")
    assert status == 400 and "image/png or image/jpeg" in out["error"]
    status, out = post(url, encoded(Image.new("L", (5000, 4000)), "PNG"), "image/png")  # small file, 20 M pixels
    assert status == 413 and "more than 16,000,000" in out["error"]
    status, out = post(url + "?feature=9999", encoded(photo, "PNG"), "image/png")
    assert status == 400 and "does not exist" in out["error"]
    # a body above the upload limit is refused from its content-length, before it is read
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    conn.putrequest("POST", parts.path)
    conn.putheader("content-type", "image/png")
    conn.putheader("content-length", str(4 * 2**20 + 1))
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "4096 KiB" in response.read().decode()
    conn.close()


def test_a_vision_run_beside_a_text_run(vision_run, app_runs):
    """Served together: the runs page lists both; the text run's pages do not offer the vision run as a peer."""
    proc, url, _ = start_serve(str(app_runs["topk"]), str(vision_run))
    try:
        status, _, body = get(url + "/")
        page = body.decode()
        assert status == 200 and 'href="/r/vis/"' in page and 'href="/r/topk/"' in page
        status, _, body = get(url + "/r/topk/features")
        assert status == 200 and 'href="/r/vis/"' in body.decode()  # the run bar links a vision run to its overview
        assert get(url + "/r/topk/f/0")[0] == 200
        assert get(url + "/r/vis/")[0] == 200
    finally:
        stop(proc)


def test_feature_list_search_and_a_page_for_every_feature(vision_run, vision_server):
    """With the run's feature store: the list (sorted by density), the search by id, and a feature page with
    pictures for a latent the run's report did not keep; its heat-map's hottest cell is its top patch."""
    from featurekit.features.store import FeatureStore

    url = vision_server[0]
    status, _, body = get(url + "/r/vis/features?sort=density&order=desc")
    page = body.decode()
    store = FeatureStore(vision_run / "features.sqlite")
    try:
        live = store.list_features("density", True, 0, 50, live_only=True)
        kept = {f["latent"] for f in json.loads((vision_run / "features" / "top_patches.json").read_text())}
        other = next(r["id"] for r in live if r["id"] not in kept and store.feature(r["id"])["examples"]["top"][0]["position"] > 0)
        top = store.feature(other)["examples"]["top"][0]
    finally:
        store.close()
    assert status == 200 and "images have no token text to search" in page
    assert re.findall(r'class="flink" href="/r/vis/f/(\d+)"', page) == [str(r["id"]) for r in live]
    assert "fires on (CLS / patch)" in page
    status, _, body = get(url + f"/r/vis/search?q={other}")  # an id: that feature's page
    page = body.decode()
    assert status == 200 and f"Feature #{other}" in page and "Activation histogram" in page and "views of the feature store" in page
    heats = re.findall(r'<img class="heat" src="([^"]+)"', page)
    assert heats and all(get(url + h)[0] == 200 for h in heats)
    assert f"/heat/{top['context']}.png" in heats[0]
    with Image.open(io.BytesIO(get(url + heats[0])[2])) as im:
        a = np.asarray(im.convert("RGB"), dtype=float)
    red = (a[..., 0] - (a[..., 1] + a[..., 2]) / 2).reshape(4, 56, 4, 56).mean(axis=(1, 3))
    assert np.unravel_index(red.argmax(), red.shape) == divmod(top["position"] - 1, 4)


def test_feature_page_shows_one_firing_count_the_stores(vision_run, vision_server):
    """With a store, a feature page's firing counts and kind are the store's, over its 40 views, and say so; the
    report's counts over the evaluation's 20 views (token_kinds.json) appear nowhere on it, also for a latent the
    report kept, whose page once showed both."""
    from featurekit.features.store import FeatureStore

    url = vision_server[0]
    kinds = json.loads((vision_run / "features" / "token_kinds.json").read_text())
    kept = [f["latent"] for f in json.loads((vision_run / "features" / "top_patches.json").read_text())]
    store = FeatureStore(vision_run / "features.sqlite")
    try:
        assert store.meta["n_views"] == 40
        pages = {i: store.feature(i) for i in kept}
    finally:
        store.close()
    differ = [i for i in kept if (kinds["cls_fires"][i], kinds["patch_fires"][i])
              != (pages[i]["extra"]["cls_fires"], pages[i]["extra"]["patch_fires"])]
    assert differ  # the two sources disagree on the fixture's latents: the test can tell them apart
    for latent in differ[:3]:
        c, p = pages[latent]["extra"]["cls_fires"], pages[latent]["extra"]["patch_fires"]
        status, _, body = get(f"{url}/r/vis/f/{latent}")
        head = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", re.search(r'<div class="head">(.*?)</div>', body.decode(), re.S).group(1)))
        assert status == 200
        assert (f"fires {pages[latent]['fires']} times on the 40 held-out views of the feature store: "
                f"{c} on CLS tokens, {p} on patches") in head, head
        assert pages[latent]["fires"] == c + p
        assert len(re.findall(r"CLS", head)) == 1 and "firings" not in head, head  # one count, no second one
        label = {"cls": "CLS-token feature", "patch": "patch feature", "dead": "silent feature"}[pages[latent]["extra"]["kind"]]
        assert label in head, head


def test_a_vision_run_without_a_store_names_the_command(vision_run, tmp_path):
    import shutil

    from featurekit.app.queries import BadRequest, feature_list
    from featurekit.app.vision import VisionRun

    copy = tmp_path / "vis"
    shutil.copytree(vision_run, copy, ignore=shutil.ignore_patterns("features.sqlite", "activations"))
    run = VisionRun(0, "vis", copy)
    with pytest.raises(BadRequest, match="without a feature store: build it with `featurekit features"):
        feature_list(run)
    latent = next(iter(run.tops))
    f = run.feature(latent)  # the report's kept features still have pages, with the report's counts over its views
    kinds = json.loads((copy / "features" / "token_kinds.json").read_text())
    assert f["top"] and f["counted_on"] == "evaluation" and f["n_views"] == 20
    assert (f["cls_fires"], f["patch_fires"]) == (kinds["cls_fires"][latent], kinds["patch_fires"][latent])
    assert f["fires"] == f["cls_fires"] + f["patch_fires"]
