"""Faithfulness by intervention (`circuits.faithfulness`) on tiny random models: the graph's direct prediction
equals the frozen model's measured change (features held fixed) exactly, the spliced real model without ablation
is the clean model, the linear-response prediction agrees with each feature's total effect, and bad input fails;
the same for a logit-difference target (`plt-diff`: the top token against the runner-up)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.circuits import attribution, faithfulness, prune, replacement
from featurekit.errors import FeaturekitError

from .helpers import prompt, random_clt, random_set, tiny_gpt2, tiny_llama


def _setup(model, tset, diff=False):
    rm = replacement.build(model, tset, prompt())
    target, second = rm.clean_logits[-1].topk(2).indices.tolist()
    graph = attribution.attribute(rm, [target], contrast=second if diff else None)
    return rm, target, graph, prune.prune(graph, 0.8, 0.98)


@pytest.fixture(scope="module", params=["plt", "clt", "gpt2", "plt-diff"])
def case(request):
    model = tiny_gpt2() if request.param == "gpt2" else tiny_llama()
    tset = random_clt() if request.param == "clt" else random_set()
    return (model, *_setup(model, tset, request.param.endswith("diff")))


def test_logit_difference_is_measured_as_a_difference(case):
    model, rm, target, graph, pruned = case
    if graph.contrast is None:
        return
    keys = faithfulness.feature_keys(graph)
    clamps = {keys[i]: 0.0 for i in range(0, graph.n_features, 7)}
    both = faithfulness.measured_replacement(rm, target, clamps, graph.contrast)
    apart = faithfulness.measured_replacement(rm, target, clamps) - faithfulness.measured_replacement(rm, graph.contrast, clamps)
    assert abs(both - apart) < 1e-4 * float(rm.clean_logits.abs().max())
    same = faithfulness.measured_model(model, rm, target, clamps, contrast=graph.contrast)
    alone = faithfulness.measured_model(model, rm, target, clamps) - faithfulness.measured_model(model, rm, graph.contrast, clamps)
    assert abs(same - alone) < 1e-4 * float(rm.clean_logits.abs().max())


def test_spliced_model_without_ablation_is_clean(case):
    model, rm, target, graph, pruned = case
    logits = faithfulness.spliced_logits(model, rm)
    assert torch.allclose(logits, rm.clean_logits, atol=1e-4 * float(rm.clean_logits.abs().max()))


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_direct_prediction_equals_frozen_measurement(case, data):
    model, rm, target, graph, pruned = case
    idx = data.draw(st.lists(st.integers(0, graph.n_features - 1), min_size=1, max_size=12, unique=True))
    predicted = faithfulness.predicted_change(graph, target, idx)["direct"]
    measured = faithfulness.measured_frozen(rm, graph, target, idx)
    scale = float(graph.adjacency[graph.logit_index(0)].abs().sum())
    assert abs(predicted - measured) <= 1e-5 * scale + 1e-6


def test_total_effects_are_single_feature_responses(case):
    model, rm, target, graph, pruned = case
    total = faithfulness.total_effects(graph, target)
    for i in torch.randperm(graph.n_features, generator=torch.Generator().manual_seed(1))[:10].tolist():
        assert abs(-float(total[i]) - faithfulness.predicted_change(graph, target, [i])["total"]) < 1e-6
    last = (graph.features.layer == graph.n_layers - 1).nonzero().flatten()[:5].tolist()  # nothing downstream
    p = faithfulness.predicted_change(graph, target, last)
    assert abs(p["direct"] - p["total"]) < 1e-9


def test_evaluate_rows_and_random_control(case):
    model, rm, target, graph, pruned = case
    rows = faithfulness.evaluate(model, rm, graph, pruned, target, ks=(1, 3), seed=5)
    assert {r["ranking"] for r in rows} >= {"random", "influence"} and {r["k"] for r in rows} == {1, 3}
    for r in rows:
        assert r["n_ablated"] == len(r["features"]) <= r["k"]
        assert abs(r["predicted_direct"] - r["measured_frozen"]) < 1e-4
        assert all(isinstance(r[c], float) for c in ("predicted_total", "measured_replacement", "measured_model"))
    again = faithfulness.evaluate(model, rm, graph, pruned, target, ks=(1, 3), seed=5, real_model=False)
    assert [r["features"] for r in again if r["ranking"] == "random"] == [r["features"] for r in rows if r["ranking"] == "random"]
    assert "measured_model" not in again[0]
    # ablating every active feature in the replacement model vs the spliced real model: both move the logit
    everything = {k: 0.0 for k in faithfulness.feature_keys(graph)}
    assert faithfulness.measured_replacement(rm, target, everything) != 0.0


def test_refusals(case):
    model, rm, target, graph, pruned = case
    with pytest.raises(FeaturekitError, match="not a logit target"):
        faithfulness.predicted_change(graph, target + 1 if target + 1 not in graph.logit_tokens else target + 2, [0])
    with pytest.raises(FeaturekitError, match="positive"):
        faithfulness.evaluate(model, rm, graph, pruned, target, ks=(0,))
