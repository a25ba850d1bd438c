"""Feature stores for a whole transcoder set from one model pass (`featurekit circuits features`): on a tiny random
Llama set, every layer gets a store run (SET/stores/layer_L) with its latents, each layer's store is what a pass of
that layer alone gives, a rerun skips complete layers, bad layers and a CLT set are refused, and a graph traced
through the set links its feature nodes to those stores (hover record with `run` and `top`), also when
`featurekit serve --graphs` is given the graph alone (and the layers' stores are each other's connections peers)."""

from __future__ import annotations

import re
from types import SimpleNamespace

import pytest

from featurekit import cli
from featurekit.circuits import transcoder_set
from featurekit.features.store import FILENAME, FeatureStore
from featurekit.pipeline import load_run_config

from .helpers import random_clt, random_set


@pytest.fixture(scope="module")
def set_with_stores(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("set_features")
    set_dir = transcoder_set.save(random_set(model=str(tiny / "model")), root / "set")
    assert cli.main(["circuits", "features", str(set_dir), "--tokens", "1200", "--text", str(tiny / "text.txt"),
                     "--set", "features.top_n=5", "--quiet"]) == 0
    return set_dir


def test_every_layer_gets_a_store_run(set_with_stores):
    for layer in range(3):
        run = set_with_stores / "stores" / f"layer_{layer}"
        cfg = load_run_config(run)                        # a run config: the explorer's live calls load the model from it
        assert (cfg.site, cfg.output_site, cfg.dictionary.n_latents) == (f"mlp_in.{layer}", f"mlp_out.{layer}", 64)
        store = FeatureStore(run / FILENAME)
        try:
            pointer = store.meta["transcoder_set"]["dictionary_dir"]
            assert (run / pointer).resolve() == (set_with_stores / f"layer_{layer}").resolve()
            assert store.n_latents == 64 and store.meta["site"] == f"mlp_in.{layer}"
            assert store.meta["output_site"] == f"mlp_out.{layer}" and store.meta["logit_effects"]
            assert 1000 <= store.meta["n_tokens"] <= 1200
            live = [f for f in range(64) if store.feature(f)["fires"]]
            assert live and store.examples(live[0])["top"]
        finally:
            store.close()


def test_one_pass_equals_each_layer_alone(set_with_stores, tiny, tmp_path):
    """Layer 1's store from the set's shared pass has the same statistics and examples as a pass of layer 1 alone."""
    from featurekit.dictionaries import load
    from featurekit.features.build import build_store
    from featurekit.models import load_model
    from featurekit.pipeline.features import store_contexts
    from featurekit.pipeline.set_features import set_store_config

    folders = transcoder_set.layer_folders(set_with_stores)
    cfg = set_store_config(set_with_stores, folders, str(tiny / "text.txt"), 1200, ["features.top_n=5"])
    loaded = load_model(cfg.model.name)
    ids, mask, _ = store_contexts(loaded, cfg, str(tiny / "text.txt"))
    alone = build_store(loaded.model, loaded.tokenizer, load(folders[1]).eval(), ids, mask, tmp_path / FILENAME,
                        site="mlp_in.1", meta={"output_site": "mlp_out.1"}, max_norm_multiple=cfg.data.max_norm_multiple,
                        top_n=5, progress=False)
    a, b = FeatureStore(alone), FeatureStore(set_with_stores / "stores" / "layer_1" / FILENAME)
    try:
        for f in range(64):
            assert a.feature(f) == b.feature(f)
            assert a.examples(f) == b.examples(f)
    finally:
        a.close()
        b.close()


def test_rerun_skips_complete_layers_and_refusals(set_with_stores, tiny, tmp_path, capsys):
    stores = sorted((set_with_stores / "stores").glob("*/" + FILENAME))
    before = [p.stat().st_mtime_ns for p in stores]
    assert cli.main(["circuits", "features", str(set_with_stores), "--tokens", "1200", "--text", str(tiny / "text.txt"),
                     "--set", "features.top_n=5", "--quiet"]) == 0
    assert "complete, skipped" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in stores] == before
    assert cli.main(["circuits", "features", str(set_with_stores), "--layers", "1,4"]) == 2
    assert "no transcoder for layers [4]" in capsys.readouterr().err
    assert cli.main(["circuits", "features", str(set_with_stores), "--set", "data.context_len=8"]) == 2
    assert "only features.*" in capsys.readouterr().err
    clt_dir = transcoder_set.save(random_clt(), tmp_path / "clt")
    assert cli.main(["circuits", "features", str(clt_dir)]) == 2
    assert "per-layer sets only" in capsys.readouterr().err


def test_graph_nodes_link_to_the_set_stores(set_with_stores, tmp_path):
    """A graph traced through the set: `store_runs` finds the three stores, and with them served every feature node's
    hover record names its layer's store run and that feature's top tokens; `serve --graphs G.json` alone serves them."""
    from featurekit.app.graphs import ServedGraph
    from featurekit.app.runs import Runs

    from ..app.conftest import start_serve, stop
    from ..app.test_http import request

    out = tmp_path / "graph.json"
    assert cli.main(["trace", "--set", str(set_with_stores), "--prompt", "the cat sat on the", "--out", str(out),
                     "--node-threshold", "0.99"]) == 0
    graph = ServedGraph(0, "g", out)
    found = graph.store_runs()
    assert [p.name for p in found] == ["layer_0", "layer_1", "layer_2"]
    runs = Runs(found)
    try:
        layout = graph.layout(runs)
    finally:
        runs.close()
    feats = [n for n in layout["nodes"] if n["kind"] == "feat"]
    assert feats and all(n["run"] == f"layer_{n['layer']}" for n in feats)
    assert any(n["top"] for n in feats)
    proc, url, lines = start_serve("--graphs", str(out))
    server = SimpleNamespace(url=url)
    try:
        assert any("layers [0, 1, 2] link to runs" in line for line in lines)
        status, _, page = request(server, "/g/graph/")
        assert status == 200
        hrefs = re.findall(r'class="nd feat"[^>]*data-id="(\d+)_(\d+)_\d+"[^>]*data-href="([^"]*)"', page)
        assert hrefs and all(href == f"/r/layer_{layer}/f/{latent}" for layer, latent, href in hrefs)
        assert request(server, hrefs[0][2])[0] == 200
        # the layers' stores are each other's peers: the connections page of a layer-1 feature has both tables
        latent = next(latent for layer, latent, _ in hrefs if layer == "1")
        for query in ("", "?mig=1"):
            status, _, page = request(server, f"/r/layer_1/f/{latent}/connections{query}")
            assert status == 200 and "/r/layer_0/f/" in page and "/r/layer_2/f/" in page, "".join(lines)[-3000:]
        assert 'class="grid conn mig"' in page and "mean input × gradient" in page
    finally:
        stop(proc)
