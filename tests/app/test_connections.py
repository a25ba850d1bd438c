"""Input-invariant connections (virtual weights) between transcoder runs: each number is the change of the reading
transcoder's own pre-activation (its folded encoder) when the writing feature's decoder row, through the norm's γ,
is its input; the page over HTTP, and its refusals."""

from __future__ import annotations

import pytest
import torch

from featurekit.app import connections, live
from featurekit.app.runs import Runs

from .conftest import RUNS
from .test_http import request


@pytest.fixture(scope="module")
def layer0_run(xss_tiny, tmp_path_factory):
    """A second transcoder run, at layer 0 (the session's `transcoder` run is at layer 1)."""
    from featurekit import pipeline
    from featurekit.config import load_config

    out = tmp_path_factory.mktemp("conn_runs")
    cfg = pipeline.resolve(load_config(None, [
        f"out_dir={out}", "name=tc0", f"model.name={xss_tiny / 'model'}", "model.dtype=float32",
        f"data.source={xss_tiny / 'text.txt'}", "data.context_len=32", "data.train_tokens=2000", "data.shard_tokens=2000",
        "dictionary.n_latents=32", "train.batch_size=256", "train.buffer_tokens=1024", "train.epochs=1",
        "eval.tokens=300", "eval.splice_contexts=4", "eval.batch_contexts=4", "report.n_features=1",
        "features.tokens=1000", "features.top_n=3", "train.threads=1",
        *[x.replace("mlp_in.1", "mlp_in.0") for x in RUNS["transcoder"]]]))
    pipeline.run_all(cfg, progress=False)
    return cfg.run_dir


def test_virtual_weights_are_pre_activation_changes(layer0_run, app_runs):
    runs = Runs([app_runs["transcoder"], layer0_run, app_runs["topk"]])
    models = live.Models()
    try:
        down, up = runs.get("transcoder"), runs.get("tc0")
        loaded, _ = models.use(down)
        gamma = loaded.model.model.layers[1].post_attention_layernorm.weight.detach().float()
        reader = connections._folded(down)
        writer = connections._folded(up)
        c = connections.connections(models, runs, down, 5)
        assert c["layer"] == 1 and c["peers"] == ["tc0"] and c["down"] == [] and len(c["up"]) == connections.TOP
        assert [abs(r["v"]) for r in c["up"]] == sorted((abs(r["v"]) for r in c["up"]), reverse=True)
        with torch.no_grad():
            base = reader.pre_activation(torch.zeros(1, gamma.numel()))[0, 5]
            for r in c["up"]:
                moved = reader.pre_activation((gamma * writer.W_dec[r["id"]])[None])[0, 5]
                assert r["run"] == "tc0" and r["layer"] == 0
                assert abs(float(moved - base) - r["v"]) <= 1e-4 * max(1e-3, abs(r["v"]))
        back = connections.connections(models, runs, up, 0)
        assert back["up"] == [] and len(back["down"]) == connections.TOP and back["down"][0]["run"] == "transcoder"
        with pytest.raises(live.BadRequest, match="connections are between transcoders"):
            connections.connections(models, runs, runs.get("topk"), 0)
    finally:
        runs.close()


def test_connections_page(server):
    status, _, page = request(server, "/r/transcoder/f/3/connections")
    assert status == 200 and "No other transcoder run" in page
    assert "/r/transcoder/f/3/connections" in request(server, "/r/transcoder/f/3")[2]
    assert "/connections" not in request(server, "/r/topk/f/3")[2]
    assert request(server, "/r/topk/f/3/connections")[0] == 400
    assert request(server, "/r/transcoder/f/100000/connections")[0] == 404


def test_mean_input_gradient_panel(layer0_run, app_runs, server):
    """The connections' mean input × gradient rows are `circuits.connections` over the store's top examples (the
    same numbers, ranked by |value|), both directions; the page offers and shows them."""
    from featurekit.circuits import connections as circuit_connections
    from featurekit.features.store import FeatureStore

    runs = Runs([app_runs["transcoder"], layer0_run])
    models = live.Models()
    try:
        down, up = runs.get("transcoder"), runs.get("tc0")
        feature = next(f for f in range(down.n_latents) if down.query(FeatureStore.example_contexts, f, "top", 4))
        c = connections.connections(models, runs, down, feature, k=4, mig=True, n_examples=4)
        examples = down.query(FeatureStore.example_contexts, feature, "top", 4)
        assert c["mig_examples"] == len(examples) > 0 and c["mig_down"] == [] and len(c["mig_up"]) == 4
        loaded, _ = models.use(down)
        direct = circuit_connections.upstream(loaded.model, connections._folded(down), 1, feature,
                                              {0: connections._folded(up)}, examples)[0]
        assert [r["id"] for r in c["mig_up"]] == direct.abs().topk(4).indices.tolist()
        assert all(abs(r["v"] - float(direct[r["id"]])) < 1e-5 for r in c["mig_up"])
        source = next(f for f in range(up.n_latents) if up.query(FeatureStore.example_contexts, f, "top", 2))
        back = connections.connections(models, runs, up, source, k=3, mig=True, n_examples=2)
        assert back["mig_up"] == [] and len(back["mig_down"]) == 3 and back["mig_down"][0]["run"] == "transcoder"
        assert "mig_up" not in connections.connections(models, runs, down, feature)
    finally:
        runs.close()
    status, _, page = request(server, "/r/transcoder/f/3/connections?mig=1")   # the served run has no peers
    assert status == 200 and "No other transcoder run" in page
