"""`featurekit serve` over plain HTTP (no browser): every route for every method's run, the security headers,
error pages, path traversal, size limits, the Host check, and that the server writes nothing into a run."""

from __future__ import annotations

import http.client
import json
import re
from urllib.parse import quote, urlencode, urlsplit

import pytest
from markupsafe import escape

from featurekit.features.store import FeatureStore

from .conftest import XSS, snapshot


def request(server, path: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, headers, text) of one raw request: the path goes on the wire exactly as given."""
    host = urlsplit(server.url)
    conn = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host="Host" in (headers or {}), skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read().decode("utf-8", "replace")
    finally:
        conn.close()


def form(server, path: str, fields: dict):
    return request(server, path, "POST", urlencode(fields).encode(), {"Content-Type": "application/x-www-form-urlencoded"})


def live_feature(run_dir) -> int:
    store = FeatureStore(run_dir)
    try:
        return store.list_features("fires", True, 0, 1)[0]["id"]
    finally:
        store.close()


def assert_secure(headers: dict) -> None:
    csp = headers.get("content-security-policy", "")
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
    assert "frame-ancestors 'none'" in csp and headers.get("x-content-type-options") == "nosniff"


@pytest.mark.parametrize("name", ["topk", "abstopk", "transcoder", "snmf", "attn", "itda"])
def test_every_page_of_every_method(server, name):
    f = live_feature(server.runs[name])
    pages = {
        f"/r/{name}/": ["FVU", "loss recovered", "Training curves", "Firing rate per latent"],
        f"/r/{name}/features": ["page 1 of", f'href="/r/{name}/f/'],
        f"/r/{name}/features?sort=max&order=asc&live=0&page=1": ["page 1 of"],
        f"/r/{name}/f/{f}": [f"Feature <span class=\"fid\">#{f}</span>", "Top activations", "Quantile band", "Decoder neighbours"],
        f"/r/{name}/search?q=cat": ["Features that fire on the token"],
        f"/r/{name}/search?q=tree&by=explanation": ["Explanations containing"],
        f"/r/{name}/try": ["Try a text"],
        f"/r/{name}/steer?f0={f}&s0=2": ["Steer", f'value="{f}"'],
    }
    for path, expected in pages.items():
        status, headers, text = request(server, path)
        assert status == 200, (path, text[:500])
        assert headers["content-type"].startswith("text/html")
        assert_secure(headers)
        for piece in expected:
            assert piece in text, (path, piece)
    status, headers, text = request(server, f"/r/{name}/api/features/{f}")
    data = json.loads(text)
    assert status == 200 and data["id"] == f and data["fires"] > 0 and "top" in data["examples"]
    status, headers, _ = request(server, f"/r/{name}/search?q={f}")
    assert status == 303 and headers["location"] == f"/r/{name}/f/{f}"
    status, _, text = form(server, f"/r/{name}/try", {"text": "the cat sat on the mat " + XSS[0]})
    assert status == 200 and 'id="trytext"' in text and "Features on this text" in text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text and XSS[0] not in text
    status, _, text = form(server, f"/r/{name}/steer", {"prompt": "the cat sat", "f0": str(f), "s0": "4", "n": "6"})
    assert status == 200 and 'id="plain"' in text and 'id="steered"' in text, text[:2000]


def test_method_specific_sections(server):
    _, _, text = request(server, f"/r/abstopk/f/{live_feature(server.runs['abstopk'])}")
    assert "Most negative activations" in text and "Negative codes" in text  # signed: both tails
    _, _, text = request(server, f"/r/transcoder/f/{live_feature(server.runs['transcoder'])}")
    assert "mlp_in.1" in text and "mlp_out.1" in text  # input and output sites
    _, _, text = request(server, f"/r/attn/f/{live_feature(server.runs['attn'])}")
    assert "Attention heads" in text and "head 3" in text  # attn_z: the decoder norm's share per head
    _, _, text = request(server, "/r/topk/f/0")
    assert "Nearest in <a href=\"/r/abstopk/\">abstopk</a>" in text and "Nearest in <a href=\"/r/itda/\">itda</a>" in text
    assert "/r/abstopk/f/" in text and "Nearest in <a href=\"/r/snmf/" not in text  # other site: no cosine
    _, _, text = request(server, "/")
    assert all(f'href="/r/{name}/"' in text for name in server.runs)
    _, _, text = request(server, "/r/1/")  # by index: the second run on the command line
    assert "<h1>abstopk</h1>" in text


def test_xss_strings_are_escaped_everywhere(server):
    tokens = {}
    for x in XSS[:3]:  # markup: only ever escaped
        status, _, text = request(server, "/r/topk/search?" + urlencode({"q": x, "by": "token"}))
        assert status == 200 and x not in text and escape(x) in text
        tokens[x] = re.findall(r'href="/r/topk/f/(\d+)"', text)
    f = next(iter(tokens[XSS[0]]))
    status, _, text = request(server, f"/r/topk/f/{f}")
    assert status == 200 and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    for x in XSS[:3]:  # markup: only ever escaped
        assert x not in text
    assert "{{7*7}}" in text and "&amp;amp;lt;" in text  # template syntax shown as is, entities escaped once more
    status, _, text = request(server, "/r/topk/f/" + quote(XSS[0], safe=""))
    assert status == 404 and "&lt;script&gt;" in text and "<script>alert" not in text
    status, _, text = request(server, "/r/" + quote(XSS[1], safe="") + "/")
    assert status == 404 and "<img src=x" not in text


def test_errors_are_pages_with_a_message(server):
    cases = [("/r/nope/", 404, "no run &#39;nope&#39; is served here"), ("/r/topk/f/64", 404, "features 0–63"),
             ("/r/topk/f/abc", 404, "whole number"), ("/r/topk/f/-1", 404, "whole number"),
             ("/r/topk/features?sort=evil", 400, "cannot sort by"), ("/r/topk/features?page=999", 404, "does not exist"),
             ("/r/topk/features?page=x", 400, "whole number"), ("/r/topk/search?q=", 400, "type something"),
             ("/r/topk/search?q=x&by=path", 400, "cannot search by"), ("/nothing/here", 404, "nothing is served"),
             ("/r/topk/steer?prompt=a&f0=99999&s0=1", 400, "not a feature of this run")]
    for path, code, message in cases:
        status, headers, text = request(server, path)
        assert status == code and message in text, (path, status, text[:300])
        assert headers["content-type"].startswith("text/html") and "Traceback" not in text
        assert_secure(headers)
    status, headers, text = request(server, "/r/topk/f/1", "POST", b"")
    assert status == 405 and "not allowed" in text
    assert_secure(headers)


def test_no_path_traversal(server):
    run = server.runs["topk"]
    paths = ["/static/../../../../etc/passwd", "/static/..%2f..%2f..%2fetc%2fpasswd", "/static/%2e%2e/%2e%2e/etc/passwd",
             "/static/..", "/static/app.css/../../config.json", "/r/..%2f..%2f..%2fetc/", "/r/%2Fetc%2Fpasswd/",
             "/r/" + quote(str(run), safe="") + "/", "/r/topk/../../../etc/passwd", "/r/topk/f/..%2fconfig.json",
             "/r/topk/%2e%2e/%2e%2e/config.json", "/../../../../etc/passwd", "/r/topk/config.json", "/r/topk/features.sqlite",
             "/r/topk/dictionary/model.safetensors", "/static/%00", "/r/..%5c..%5cconfig.json/"]
    for path in paths:
        status, _, text = request(server, path)
        assert status in (404, 400), (path, status)
        assert "root:" not in text and '"dictionary"' not in text and "SQLite format" not in text, path
    status, headers, text = request(server, "/static/app.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript") and "use strict" in text


def test_oversized_input_is_refused_with_a_clear_message(server):
    status, headers, text = form(server, "/r/topk/try", {"text": "cat " * 1001})
    assert status == 413 and "4,004 characters long; the limit is 4,000" in text
    assert_secure(headers)
    status, _, text = form(server, "/r/topk/try", {"text": "a" * 10 + " cat" * 600})
    assert status == 413 and "tokens long; the limit is 512" in text
    status, _, text = request(server, "/r/topk/try", "POST", b"text=" + b"x" * (70 * 1024),
                              {"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 413 and "larger than 64 KiB" in text
    status, _, text = request(server, "/r/topk/try?text=" + "a" * 9000)
    assert status == 414 and "longer than 8 KiB" in text
    status, _, text = form(server, "/r/topk/steer", {"prompt": "the cat", "f0": "1", "s0": "1", "n": "500"})
    assert status == 413 and "between 1 and 64" in text
    status, _, text = form(server, "/r/topk/steer", {"prompt": "the cat", "f0": "1", "s0": "1e9"})
    assert status == 400 and "outside ±100" in text
    many = {"prompt": "the cat", **{f"f{i}": str(i) for i in range(6)}, **{f"s{i}": "1" for i in range(6)}}
    status, _, text = form(server, "/r/topk/steer", many)
    assert status == 413 and "at most 4" in text


def test_only_loopback_host_names_are_served(server):
    status, _, _ = request(server, "/", headers={"Host": "evil.example"})
    assert status == 400
    status, _, _ = request(server, "/", headers={"Host": "localhost"})
    assert status == 200


def test_the_server_writes_nothing_into_a_run(server):
    f = live_feature(server.runs["topk"])
    for name in server.runs:
        form(server, f"/r/{name}/try", {"text": "the cat sat"})
        request(server, f"/r/{name}/f/{f if name == 'topk' else 0}")
    assert {name: snapshot(path) for name, path in server.runs.items()} == server.before
