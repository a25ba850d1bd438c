"""The graph viewer over plain HTTP: `serve --graphs` lists and draws the graph files (every node and edge, feature
nodes of the linked run's layer pointing at its feature pages, tokens escaped), a graph with no edges and an unknown
feature, and the intervention endpoint (JSON in and out, its refusals)."""

from __future__ import annotations

import json
import re

from .conftest import XSS
from .test_http import request


def post(server, path: str, body) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, _, text = request(server, path, "POST", raw, {"Content-Type": "application/json"})
    return status, json.loads(text)


def test_graph_list_and_page(server, graph_files):
    status, headers, text = request(server, "/g/")
    assert status == 200 and "/g/tiny/" in text and "/g/bare/" in text
    status, headers, page = request(server, "/g/tiny/")
    assert status == 200 and "script-src 'self'" in headers["content-security-policy"]
    doc = json.loads(graph_files["tiny"].read_text(encoding="utf-8"))
    assert page.count('<line class="e ') == len(doc["links"]) > 0
    assert len(re.findall(r'class="nd (?:feat|err|emb|logit)"', page)) == len(doc["nodes"])
    assert XSS[0] not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the prompt's HTML token, escaped
    assert page.count("<script") == 1
    hrefs = set(re.findall(r'data-id="(\d+)_(\d+)_\d+"[^>]*data-href="([^"]*)"', page))
    assert {layer for layer, _, href in hrefs if href} == {"1"}  # only layer 1's transcoder is a served run's
    layer1 = [(latent, href) for layer, latent, href in hrefs if layer == "1"]
    assert layer1 and all(href == f"/r/transcoder/f/{latent}" for latent, href in layer1)
    assert request(server, layer1[0][1])[0] == 200
    assert "no kept edges" not in page


def test_graph_without_edges_and_an_unknown_feature(server):
    status, _, page = request(server, "/g/bare/")
    assert status == 200 and "no kept edges" in page and '<line class="e ' not in page
    unknown = re.search(r'<circle [^>]*data-id="1_999_2"[^>]*>', page).group(0)
    assert 'data-href=""' in unknown and "data-top='[]'" in unknown
    status, _, page = request(server, "/g/nope/")
    assert status == 404 and "no graph" in page and "tiny" in page
    status, body = post(server, "/g/bare/intervene", {"clamps": [{"node": "1_999_2", "value": 1}]})
    assert status == 400 and "not a feature of the graph's transcoders" in body["error"]


def test_intervention(server, graph_files):
    doc = json.loads(graph_files["tiny"].read_text(encoding="utf-8"))
    feature = next(n for n in doc["nodes"] if n["node_id"].startswith("1_"))
    status, same = post(server, "/g/tiny/intervene", {"clamps": [{"node": feature["node_id"], "value": feature["activation"]}]})
    assert status == 200 and len(same["clamped"]) == len(same["baseline"]) == 10
    assert abs(same["clamps"][0]["was"] - feature["activation"]) < 1e-6
    assert [r["id"] for r in same["clamped"]] == [r["id"] for r in same["baseline"]]  # its own value: nothing moves
    assert max(abs(a["prob"] - b["prob"]) for a, b in zip(same["clamped"], same["baseline"])) < 1e-5
    top = max((n for n in doc["nodes"] if n["feature_type"] == "logit"), key=lambda n: n["token_prob"])
    assert same["baseline"][0]["id"] == top["feature"] and abs(same["baseline"][0]["prob"] - top["token_prob"]) < 1e-4
    status, moved = post(server, "/g/tiny/intervene", {"clamps": [{"node": feature["node_id"], "value": 500}]})
    assert status == 200 and max(abs(r["delta_prob"]) for r in moved["clamped"]) > 1e-3
    assert all(isinstance(r["token"], str) for r in moved["clamped"])


def test_intervention_refusals(server, graph_files):
    doc = json.loads(graph_files["tiny"].read_text(encoding="utf-8"))
    emb, err = (next(n["node_id"] for n in doc["nodes"] if n["feature_type"] == kind) for kind in ("embedding", "mlp reconstruction error"))
    feature = next(n["node_id"] for n in doc["nodes"] if n["node_id"].startswith("1_"))
    cases = [(b"not json", "not JSON"), ({"clamps": []}, "clamps"), ({"clamps": [{"node": "9_9_9", "value": 1}]}, "not a node"),
             ({"clamps": [{"node": emb, "value": 1}]}, "only feature nodes"),
             ({"clamps": [{"node": err, "value": 1}]}, "only feature nodes"),
             ({"clamps": [{"node": feature, "value": "x"}]}, "not a number"),
             ({"clamps": [{"node": feature, "value": 1}] * 5}, "at most 4")]
    for body, message in cases:
        status, answer = post(server, "/g/tiny/intervene", body)
        assert status in (400, 404) and answer["error"], (body, answer)
        assert message is None or message in answer["error"], (message, answer)
    status, answer = post(server, "/g/bare/intervene", {"clamps": [{"node": "1_999_2", "value": 1e9}]})
    assert status == 400 and "outside" in answer["error"]
    status, answer = post(server, "/g/nope/intervene", {"clamps": []})
    assert status == 404 and "no graph" in answer["error"]
    assert request(server, "/g/tiny/intervene")[0] == 405


def test_graph_files_are_checked(tmp_path, graph_files):
    import pytest

    from featurekit.app.graphs import Graphs
    from featurekit.errors import FeaturekitError

    for text, message in [("{", "not a JSON file"), ('{"nodes": 3}', "not an attribution graph"), ("[]", "not an attribution graph")]:
        (tmp_path / "g.json").write_text(text, encoding="utf-8")
        with pytest.raises(FeaturekitError, match=message):
            Graphs([tmp_path / "g.json"])
    with pytest.raises(FeaturekitError, match="cannot read the graph file"):
        Graphs([tmp_path / "missing.json"])
    graphs = Graphs([graph_files["tiny"], graph_files["tiny"], graph_files["bare"]])
    assert [g.name for g in graphs] == ["tiny", "tiny-2", "bare"] and graphs.get("1").name == "tiny-2"


def test_graph_shows_model_name_and_partial_sets(tmp_path, graph_files, server):
    """The page names a local model by its folder's name, never the machine's path; a graph traced through a partial
    set says so and its intervention model rebuilds that partial set (its gaps stay error nodes)."""
    from featurekit.app.graphs import Graphs
    from featurekit.circuits.partial_set import PartialSet

    doc = json.loads(graph_files["tiny"].read_text(encoding="utf-8"))
    model_path = doc["metadata"]["featurekit"]["model"]
    status, _, page = request(server, "/g/tiny/")
    assert "model <code>model</code>" in page and model_path not in page and "partial" not in page
    doc["metadata"]["featurekit"]["partial_set"] = {"covered": [0, 2], "missing": [1]}
    doc["metadata"]["transcoder_list"][1] = "none"
    (tmp_path / "partial.json").write_text(json.dumps(doc), encoding="utf-8")
    graph = Graphs([tmp_path / "partial.json"]).get("partial")
    assert graph.partial == {"covered": [0, 2], "missing": [1]} and graph.model_label == "model"
    tset = graph.intervener._transcoders()
    assert isinstance(tset, PartialSet) and tset.missing == [1] and tset.covered == [0, 2]


def test_the_page_draws_only_the_strongest_edges_of_a_large_graph(graph_files):
    """`layout(max_edges=N)` keeps the N edges of largest |weight| (the page's cap, `MAX_DRAWN_EDGES`), every node,
    and counts what it left out; the scale (`peak`) stays the whole graph's."""
    from featurekit.app.graphs import Graphs

    graph = Graphs([graph_files["tiny"]]).get("tiny")
    weights = sorted((abs(float(e["weight"])) for e in graph.links), reverse=True)
    assert len(weights) > 6
    full, cut = graph.layout([]), graph.layout([], max_edges=5)
    assert len(full["edges"]) == len(weights) and full["edges_cut"] == 0
    assert len(cut["edges"]) == 5 and cut["edges_cut"] == len(weights) - 5
    assert sorted((abs(e["w"]) for e in cut["edges"]), reverse=True) == weights[:5]
    assert len(cut["nodes"]) == len(full["nodes"]) and cut["peak"] == full["peak"] == weights[0]
