"""The exactness checks on the embedded SmolLM2-135M (30 Llama blocks, grouped-query attention) with random
transcoders at every layer: replacement logits, edges against ablations of their sources (in float64, where the
float32 rounding of large target values would hide them) and edges into each node against its value."""

import dataclasses

import pytest
import torch

from featurekit.circuits import attribution, replacement
from featurekit.circuits.sets import TranscoderSet
from featurekit.circuits.trace import prompt_ids
from featurekit.dictionaries import Transcoder


def _to_float64(obj):
    if isinstance(obj, torch.Tensor):
        return obj.double()
    if isinstance(obj, list):
        return [_to_float64(x) for x in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, (type, TranscoderSet)):
        for f in dataclasses.fields(obj):
            setattr(obj, f.name, _to_float64(getattr(obj, f.name)))
    return obj


@pytest.mark.embedded
@pytest.mark.slow
def test_smollm2_replacement_and_edges_are_exact():
    from featurekit.models.loading import load_model

    loaded = load_model("smollm2-135m")
    d = loaded.d_model

    def random_tc(layer):
        tc = Transcoder(d, 256, k=4, d_out=d, seed=layer)
        with torch.no_grad():
            tc.W_dec.copy_(torch.randn(256, d, generator=torch.Generator().manual_seed(layer)) * 0.01)
        return tc.eval()

    tset = TranscoderSet({layer: random_tc(layer) for layer in range(loaded.n_layers)})
    ids = prompt_ids(loaded.tokenizer, "The capital of France is")
    rm = replacement.build(loaded.model, tset, ids)
    with torch.no_grad():
        clean = loaded.model(input_ids=ids[None]).logits[0]
    assert float((rm.replacement_logits() - clean).abs().max() / clean.abs().max()) <= 1e-4
    graph = attribution.attribute(rm, max_n_logits=2)
    assert graph.n_features == 4 * loaded.n_layers * len(ids)

    default = torch.get_default_dtype()
    _to_float64(rm)
    for tc in rm.transcoders.transcoders.values():
        tc.double()
    graph.features.activation = graph.features.activation.double()
    torch.set_default_dtype(torch.float64)
    try:
        rows = list(range(graph.n_features)) + [graph.logit_index(k) for k in range(graph.n_logits)]
        A = graph.adjacency[rows].double()
        sources = torch.randperm(graph.n_features, generator=torch.Generator().manual_seed(0))[:48]
        scale = torch.ones(len(sources) + 1, graph.n_features)
        scale[torch.arange(len(sources)), sources] = 0.0                     # ablate each sampled feature in turn
        v = attribution.target_values(rm, graph, rm.writes(feature_scale=scale))
        measured, predicted = v[-1] - v[:-1], A[:, sources].T
        assert float((measured - predicted).abs().max() / predicted.abs().max()) <= 1e-4
        value = v[-1]
        zero = rm.writes(torch.zeros(1, graph.n_features), torch.zeros(1, graph.n_layers, graph.n_pos))
        bias_part = attribution.target_values(rm, graph, zero, torch.zeros_like(rm.embeddings)[None])[0]
        assert float((A.sum(1) - (value - bias_part)).abs().max() / (value - bias_part).abs().max()) <= 1e-4
    finally:
        torch.set_default_dtype(default)
