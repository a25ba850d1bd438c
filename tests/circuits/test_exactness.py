"""The local replacement model and the attribution graph are exact on tiny random Llama and GPT-2 models, with
per-layer transcoders (PLT) and with a cross-layer transcoder (CLT, its latents writing to every later layer):
the replacement reproduces the clean logits, every edge equals the measured effect of a small change of its
source on its target in the frozen model, and the edges into a node add up to its value minus its bias part. The
same holds for a logit-difference target (logit(A) − logit(B), `contrast`), on one PLT and one CLT model."""

import pytest
import torch

from featurekit.circuits import attribution, replacement
from featurekit.errors import FeaturekitError

from .helpers import prompt, random_clt, random_set, tiny_gpt2, tiny_llama

MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}
SETS = {"plt": random_set, "clt": random_clt}


CASES = [(m, s, "") for m in sorted(MODELS) for s in sorted(SETS)] + [("llama", "plt", "diff"), ("gpt2", "clt", "diff")]


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(filter(None, case)))
def built(request):
    model_name, set_name, diff = request.param
    model = MODELS[model_name]()
    rm = replacement.build(model, SETS[set_name](), prompt())
    if not diff:
        return model, rm, attribution.attribute(rm, batch_size=32)
    second, first = rm.clean_logits[-1].topk(2).indices.tolist()[::-1]   # the top token against the runner-up
    return model, rm, attribution.attribute(rm, [first], contrast=second, batch_size=32)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_replacement_reproduces_the_clean_logits(built):
    model, rm, _ = built
    with torch.no_grad():
        clean = model(input_ids=prompt()[None]).logits[0]  # the model's default (sdpa) attention, not the eager capture
    assert model.config._attn_implementation == "sdpa"  # restored after the eager capture
    assert rel(rm.replacement_logits(), clean) <= 1e-4
    # the frozen model fed the model's own MLP outputs gives back every layer's MLP input
    ins, final = rm.run(rm.embeddings[None], lambda layer, m: rm.mlp_out[layer][None])
    for layer, m in enumerate(ins):
        assert rel(m[0], rm.mlp_in[layer]) <= 1e-5
    assert rel(rm.unembed(final)[0], clean) <= 1e-5
    # without the error nodes the replacement is not the model (the transcoders are random)
    assert rel(rm.replacement_logits(errors=False), clean) > 1e-2


def target_rows(graph):
    return list(range(graph.n_features)) + [graph.logit_index(k) for k in range(graph.n_logits)]


def test_edges_are_the_effects_of_small_perturbations(built):
    """Scale each source by (1 + ε) in the frozen model (features held fixed): every target moves by ε·A[t, s]."""
    _, rm, graph = built
    eps = 1e-2
    nf, L, T = graph.n_features, graph.n_layers, graph.n_pos
    A = graph.adjacency[target_rows(graph)]
    assert nf > 20 and (A != 0).sum() > 100

    f_scale = torch.ones(nf + 1, nf)
    f_scale[torch.arange(nf), torch.arange(nf)] += eps
    v = attribution.target_values(rm, graph, rm.writes(feature_scale=f_scale))
    measured = (v[:nf] - v[nf]) / eps                                   # (source, target)
    assert rel(measured, A[:, :nf].T) <= 1e-3

    e_scale = torch.ones(L * T + 1, L, T)
    e_scale[torch.arange(L * T), torch.arange(L * T) // T, torch.arange(L * T) % T] += eps
    v = attribution.target_values(rm, graph, rm.writes(error_scale=e_scale))
    errors = A[:, graph.error_index(0, 0):graph.token_index(0)]
    assert rel((v[:-1] - v[-1]) / eps, errors.T) <= 1e-3

    x0 = rm.embeddings.expand(T + 1, -1, -1).clone()
    x0[torch.arange(T), torch.arange(T)] *= 1 + eps
    v = attribution.target_values(rm, graph, [w.expand(T + 1, -1, -1) for w in rm.writes()], x0)
    tokens = A[:, graph.token_index(0):graph.logit_index(0)]
    assert rel((v[:-1] - v[-1]) / eps, tokens.T) <= 1e-3


def test_edges_into_a_node_add_up_to_its_input_minus_bias(built):
    _, rm, graph = built
    value = attribution.target_values(rm, graph, rm.writes())[0]
    zero_sources = rm.writes(torch.zeros(1, graph.n_features), torch.zeros(1, graph.n_layers, graph.n_pos))
    bias_part = attribution.target_values(rm, graph, zero_sources, torch.zeros_like(rm.embeddings)[None])[0]
    total = graph.adjacency[target_rows(graph)].sum(1)
    assert rel(total, value - bias_part) <= 1e-4
    # features' values are their pre-activations: the active ones equal their codes (TopK then ReLU)
    assert rel(value[:graph.n_features], graph.features.activation) <= 1e-4
    # logit nodes' values: demeaned logits, or with a contrast token the logit difference, of the clean logits
    last = rm.clean_logits[-1]
    base = last.mean() if graph.contrast is None else last[graph.contrast]
    assert float((value[graph.n_features:] - (last[graph.logit_tokens] - base)).abs().max()) <= 1e-4 * float(last.abs().max())


def test_edges_point_forward_only(built):
    _, rm, graph = built
    f = graph.features
    into_features = graph.adjacency[:graph.n_features, :graph.n_features]
    later_or_same = f.layer[:, None] <= f.layer[None, :]          # [target, source]: source not in an earlier layer
    assert not into_features[later_or_same].any()
    future = f.pos[:, None] < f.pos[None, :]                      # source after the target: causal mask
    assert not into_features[future].any()
    assert not graph.adjacency[graph.n_features:graph.logit_index(0)].any()  # errors and tokens have no inputs


def test_logit_targets(built):
    _, rm, graph = built
    probs = torch.softmax(rm.clean_logits[-1], -1)
    if graph.contrast is not None:
        assert graph.n_logits == 1 and graph.contrast == int(probs.topk(2).indices[1])
        with pytest.raises(FeaturekitError, match="logit difference needs"):
            attribution.attribute(rm, contrast=3)                      # no targets given
        with pytest.raises(FeaturekitError, match="logit difference needs"):
            attribution.attribute(rm, [3], contrast=3)
        return
    assert graph.logit_tokens[0] == int(probs.argmax())
    assert graph.n_logits <= 10
    ids, p = attribution.logit_targets(rm, [3, 5])
    assert ids == [3, 5] and torch.allclose(p, probs[[3, 5]])
    with pytest.raises(FeaturekitError, match="not in the vocabulary"):
        attribution.logit_targets(rm, [64])
    ids, _ = attribution.logit_targets(rm, max_n_logits=3, desired_logit_prob=1.0)
    assert len(ids) == 3
