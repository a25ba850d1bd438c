"""Transcoder set files, pruning and scores, the graph JSON (circuit-tracer / Neuronpedia schema 1.0.0) and
`featurekit trace` end to end on the tiny Llama with its tokenizer."""

import json

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM

from featurekit import cli
from featurekit._io import read_json
from featurekit.circuits import attribution, graph_json, prune, replacement, transcoder_set
from featurekit.circuits.influence import influence
from featurekit.circuits.sets import TranscoderSet
from featurekit.dictionaries import TopKSAE, Transcoder
from featurekit.errors import FeaturekitError

from .helpers import prompt, random_set, random_transcoder, tiny_gpt2, tiny_llama


@pytest.fixture(scope="module")
def llama_graph():
    rm = replacement.build(tiny_llama(), random_set(), prompt())
    return rm, attribution.attribute(rm, batch_size=64)


# -- transcoder sets -------------------------------------------------------------------------------

def test_set_round_trip_and_refusals(tmp_path):
    tset = random_set(model="tiny")
    transcoder_set.save(tset, tmp_path / "set")
    back = transcoder_set.load(tmp_path / "set")
    assert back.layers == [0, 1, 2] and back.model == "tiny" and type(back[1]).__name__ == "SkipTranscoder"
    x = torch.randn(5, 32)
    for layer in back.layers:
        assert torch.allclose(back[layer].reconstruct(x), tset[layer].reconstruct(x))
    by_folder = transcoder_set.from_folders([tmp_path / "set" / f"layer_{i}" for i in (2, 0, 1)])
    assert by_folder.layers == [0, 1, 2] and by_folder.model == "tiny"

    with pytest.raises(FeaturekitError, match="two dictionaries for layer 0"):
        transcoder_set.from_folders([tmp_path / "set" / "layer_0"] * 2)
    with pytest.raises(FeaturekitError, match="is not a transcoder set"):
        transcoder_set.load(tmp_path / "set" / "layer_0")
    with pytest.raises(FeaturekitError, match="not a transcoder"):
        TranscoderSet({0: TopKSAE(32, 64, k=4)})
    wrong = random_transcoder(0)
    wrong.metadata = {"source": {"site": "mlp_in.2", "output_site": "mlp_out.2"}}
    with pytest.raises(FeaturekitError, match="trained on mlp_in.2"):
        TranscoderSet({0: wrong})
    with pytest.raises(FeaturekitError, match=r"missing \[2\]"):
        replacement.build(tiny_llama(), TranscoderSet({0: random_transcoder(0), 1: random_transcoder(1)}), prompt())
    manifest = read_json(tmp_path / "set" / transcoder_set.MANIFEST)
    manifest["layers"][0]["path"] = "../elsewhere"
    (tmp_path / "set" / transcoder_set.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FeaturekitError, match="must stay inside the set folder"):
        transcoder_set.load(tmp_path / "set")


def test_other_families_are_refused():
    bert = BertForMaskedLM(BertConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4)).eval()
    with pytest.raises(FeaturekitError, match="llama family .* and GPT-2"):
        replacement.build(bert, random_set(), prompt())


# -- capping the feature nodes ---------------------------------------------------------------------------

def test_max_feature_nodes_keeps_the_most_influential_rows_exactly(llama_graph):
    rm, full = llama_graph
    same = attribution.attribute(rm, batch_size=64, max_feature_nodes=10_000)
    assert torch.equal(same.adjacency, full.adjacency) and same.settings["max_feature_nodes"] == full.n_features
    capped = attribution.attribute(rm, batch_size=8, max_feature_nodes=20, update_interval=1)
    assert capped.n_features == 20 and capped.settings["active_features"] == full.n_features
    key = lambda f, i: (int(f.layer[i]), int(f.pos[i]), int(f.latent[i]))  # noqa: E731
    where = {key(full.features, i): i for i in range(full.n_features)}
    chosen = [where[key(capped.features, i)] for i in range(20)]
    assert chosen == sorted(chosen)                                # still in (layer, position, latent) order
    index = torch.tensor(chosen + list(range(full.n_features, full.adjacency.shape[0])))
    assert torch.allclose(capped.adjacency, full.adjacency[index][:, index], atol=1e-6)  # the same edges, fewer nodes
    # the first pick is the feature with the largest probability-weighted share of a logit's input
    shares = prune.normalized(full.adjacency)[full.logit_index(0):, :full.n_features]
    assert int((full.logit_probabilities[:, None] * shares).sum(0).argmax()) in chosen
    pruned = prune.prune(capped)
    assert pruned.node_mask[capped.token_index(0):].all()
    with pytest.raises(FeaturekitError, match="max_feature_nodes"):
        attribution.attribute(rm, max_feature_nodes=-1)


# -- pruning and scores ------------------------------------------------------------------------------

def test_pruning_keeps_influential_nodes_and_always_tokens_and_logits(llama_graph):
    _, graph = llama_graph
    full = prune.prune(graph, 1.0, 1.0)
    tight = prune.prune(graph, 0.5, 0.9)
    fixed = slice(graph.token_index(0), None)
    assert full.node_mask[fixed].all() and tight.node_mask[fixed].all()
    assert tight.node_mask.sum() < full.node_mask.sum() <= graph.adjacency.shape[0]
    assert tight.edge_mask.sum() < full.edge_mask.sum()
    assert not (tight.edge_mask & ~full.edge_mask).any()
    for p in (full, tight):                      # kept edges join kept nodes and are non-zero edges
        t, s = p.edge_mask.nonzero(as_tuple=True)
        assert p.node_mask[t].all() and p.node_mask[s].all() and (graph.adjacency[t, s] != 0).all()
        kept_features = p.node_mask[:graph.n_features].nonzero().flatten()
        assert p.edge_mask[:, kept_features].any(0).all()      # every kept feature has an outgoing edge
    # influence: the logits' weights flow back; the most probable logit's direct inputs have influence
    assert (full.influence[:graph.logit_index(0)] >= 0).all() and full.influence.sum() > 0
    with pytest.raises(FeaturekitError, match="node_threshold"):
        prune.prune(graph, 1.5)


def _reference_prune_masks(graph, node_threshold, edge_threshold):
    """Pruning as it was written before its copies were cut (full sorts, a cloned subgraph): the masks to match."""
    def threshold(scores, fraction):
        ordered = torch.sort(scores.flatten(), descending=True).values
        total = ordered.sum()
        if total <= 0:
            return ordered[0]
        cumulative = torch.cumsum(ordered, 0) / total
        return ordered[min(int(torch.searchsorted(cumulative, torch.tensor(fraction))), ordered.numel() - 1)]

    def normalized(a):
        a = a.abs()
        return a / a.sum(1, keepdim=True).clamp_min(1e-10)

    n_f, fixed = graph.n_features, graph.token_index(0)
    w = prune.logit_weights(graph)
    infl = influence(normalized(graph.adjacency), w)
    node_mask = infl >= threshold(infl, node_threshold)
    node_mask[fixed:] = True
    sub = graph.adjacency.clone()
    sub[~node_mask] = 0
    sub[:, ~node_mask] = 0
    a_hat = normalized(sub)
    scores = a_hat * (influence(a_hat, w) + w)[:, None]
    edge_mask = (scores >= threshold(scores, edge_threshold)) & (sub != 0)
    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:fixed] &= edge_mask[:, :fixed].any(0)
        node_mask[:n_f] &= edge_mask[:n_f].any(1)
        if torch.equal(node_mask, before):
            return node_mask, edge_mask


@pytest.mark.parametrize("thresholds", [(0.8, 0.98), (0.5, 0.9), (1.0, 1.0), (0.0, 0.0), (0.99, 0.5)])
def test_pruning_with_fewer_copies_keeps_the_same_nodes_and_edges(llama_graph, thresholds):
    _, graph = llama_graph
    new = prune.prune(graph, *thresholds)
    nodes, edges = _reference_prune_masks(graph, *thresholds)
    assert torch.equal(new.node_mask, nodes) and torch.equal(new.edge_mask, edges)


def test_scores_are_fractions_and_one_without_errors(llama_graph):
    _, graph = llama_graph
    s = prune.scores(graph)
    assert 0 < s["replacement_score"] < 1 and 0 < s["completeness_score"] < 1
    # GPT-2 with ReLU MLPs and transcoders that ARE the MLPs: error nodes ~0, so both scores are ~1
    model = tiny_gpt2(activation="relu")
    exact = {}
    for layer, block in enumerate(model.transformer.h):
        width = block.mlp.c_fc.weight.shape[1]
        tc = Transcoder(32, width, k=width, d_out=32)
        with torch.no_grad():
            tc.W_enc.copy_(block.mlp.c_fc.weight.T)
            tc.b_enc.copy_(block.mlp.c_fc.bias)
            tc.W_dec.copy_(block.mlp.c_proj.weight)
            tc.b_dec.copy_(block.mlp.c_proj.bias)
        exact[layer] = tc.eval()
    rm = replacement.build(model, TranscoderSet(exact), prompt())
    assert max(float(e.abs().max()) for e in rm.errors) < 1e-5
    s = prune.scores(attribution.attribute(rm))
    assert s["replacement_score"] > 0.999 and s["completeness_score"] > 0.999


# -- graph JSON -----------------------------------------------------------------------------------------

REQUIRED = {"metadata": ["slug", "scan", "prompt_tokens", "prompt"], "node": ["node_id", "feature", "layer", "ctx_idx",
            "feature_type", "jsNodeId", "clerp"], "link": ["source", "target", "weight"]}


def check_schema(doc):
    """The required fields and types of Neuronpedia's graph-schema.json (1.0.0), checked by hand."""
    assert set(doc) >= {"metadata", "qParams", "nodes", "links"}
    meta = doc["metadata"]
    assert all(k in meta for k in REQUIRED["metadata"])
    assert isinstance(meta["slug"], str) and isinstance(meta["scan"], str) and isinstance(meta["prompt"], str)
    assert all(isinstance(t, str) for t in meta["prompt_tokens"])
    assert {"node_threshold", "edge_threshold"} <= set(meta["pruning_settings"])
    assert {"max_n_logits", "desired_logit_prob", "batch_size", "max_feature_nodes"} <= set(meta["generation_settings"])
    assert set(doc["qParams"]) == {"pinnedIds", "supernodes", "linkType", "clickedId", "sg_pos"}
    for node in doc["nodes"]:
        assert all(k in node for k in REQUIRED["node"])
        assert isinstance(node["node_id"], str) and isinstance(node["ctx_idx"], int)
        assert node["feature"] is None or isinstance(node["feature"], int)
        assert isinstance(node["layer"], (str, int)) and isinstance(node["clerp"], str)
        assert node["influence"] is None or isinstance(node["influence"], float)
    ids = [n["node_id"] for n in doc["nodes"]]
    assert len(ids) == len(set(ids))
    for link in doc["links"]:
        assert link["source"] in ids and link["target"] in ids and isinstance(link["weight"], float)


def test_graph_json_schema_and_ids(llama_graph, tmp_path):
    rm, graph = llama_graph
    pruned = prune.prune(graph)
    doc = graph_json.graph_document(graph, pruned, slug="s", scan="tiny", prompt="p", token_strings=[str(t) for t in graph.input_ids],
                                    vocab_strings={}, transcoder_list=["a", "b", "c"], widths={0: 64, 1: 64, 2: 64},
                                    node_threshold=0.8, edge_threshold=0.98)
    check_schema(doc)
    graph_json.write(doc, tmp_path / "g.json")
    assert read_json(tmp_path / "g.json") == json.loads(json.dumps(doc))
    kinds = {n["feature_type"] for n in doc["nodes"]}
    assert kinds >= {"cross layer transcoder", "embedding", "logit"}
    f = graph.features
    first = int(pruned.node_mask[:graph.n_features].nonzero()[0])
    node = next(n for n in doc["nodes"] if n["node_id"] == f"{int(f.layer[first])}_{int(f.latent[first])}_{int(f.pos[first])}")
    assert node["feature"] == int(f.layer[first]) * 100 + int(f.latent[first])   # 64 latents: offset 10^2 per layer
    assert node["activation"] == pytest.approx(float(f.activation[first]))
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert logits[0]["node_id"] == f"4_{graph.logit_tokens[0]}_{graph.n_pos - 1}" and logits[0]["is_target_logit"]
    # a link's weight is the adjacency entry [target, source]
    link = doc["links"][0]
    index = {n["node_id"]: i for i, n in enumerate(doc["nodes"])}
    assert index[link["source"]] != index[link["target"]]


# -- the command line -------------------------------------------------------------------------------------

def test_featurekit_trace_writes_a_graph(tiny, tmp_path, capsys):
    set_dir = transcoder_set.save(random_set(model=str(tiny / "model")), tmp_path / "set")
    out = tmp_path / "graph.json"
    assert cli.main(["trace", "--set", str(set_dir), "--prompt", "the cat sat on the", "--out", str(out)]) == 0
    doc = read_json(out)
    check_schema(doc)
    assert doc["metadata"]["prompt_tokens"][-1].strip() == "the"
    assert doc["metadata"]["featurekit"]["replacement_logit_error"] <= 1e-4
    assert "replacement score" in capsys.readouterr().out
    folders = [str(set_dir / f"layer_{i}") for i in range(3)]
    assert cli.main(["trace", "--transcoders", *folders, "--prompt", "the dog", "--targets", "sat", "ran",
                     "--max-feature-nodes", "5", "--out", str(tmp_path / "g2.json")]) == 0
    meta = read_json(tmp_path / "g2.json")["metadata"]
    assert meta["generation_settings"]["max_feature_nodes"] == 5 and meta["featurekit"]["n_features"] == 5
    logits = [n for n in read_json(tmp_path / "g2.json")["nodes"] if n["feature_type"] == "logit"]
    assert [n["clerp"].split('"')[1] for n in logits] == ["sat", "ran"]
    assert cli.main(["trace", "--set", str(set_dir), "--prompt", "the dog", "--targets", "sat ran", "--out", str(out)]) == 2
    assert "is 2 tokens" in capsys.readouterr().err


def test_logit_difference_on_the_command_line(tiny, tmp_path, capsys):
    """`trace --targets A --contrast B` writes one logit node for logit(A) − logit(B); `circuits faithfulness
    --contrast B` measures the change of that difference (direct prediction = frozen measurement)."""
    set_dir = transcoder_set.save(random_set(model=str(tiny / "model")), tmp_path / "set")
    out = tmp_path / "diff.json"
    assert cli.main(["trace", "--set", str(set_dir), "--prompt", "the dog", "--targets", "sat", "--contrast", "ran",
                     "--out", str(out)]) == 0
    doc = read_json(out)
    check_schema(doc)
    logits = [n for n in doc["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == 1 and logits[0]["clerp"].startswith('Output "sat" − "ran"')
    assert doc["metadata"]["featurekit"]["contrast"]["text"] == "ran"
    assert cli.main(["trace", "--set", str(set_dir), "--prompt", "the dog", "--contrast", "ran", "--out", str(out)]) == 2
    assert "--contrast needs --targets" in capsys.readouterr().err
    assert cli.main(["circuits", "faithfulness", "--set", str(set_dir), "--prompt", "the dog", "--target", "sat",
                     "--contrast", "ran", "--k", "1", "3", "--out", str(tmp_path / "f.json")]) == 0
    rows = read_json(tmp_path / "f.json")
    assert rows["contrast"] == "ran" and "logit difference" in capsys.readouterr().out
    assert all(abs(r["predicted_direct"] - r["measured_frozen"]) < 1e-4 for r in rows["rows"])
