"""The small LM: equal activated parameters, upcycling, featurekit's sites on it, bad inputs."""

import pytest
import torch

from featurekit.errors import FeaturekitError
from featurekit.models.hooks import capture_activations, replace
from featurekit.models.moexlm.lm import KINDS, LMConfig, MoexLM, activated_mlp_params, parameter_counts, upcycle
from featurekit.models.sites import check_site, site_dim, valid_sites

SMALL = dict(vocab_size=11, d_model=16, n_layer=2, n_head=2, seq_len=12, n_experts=4)


def _model(mlp: str, **kw) -> MoexLM:
    torch.manual_seed(0)
    return MoexLM(LMConfig(**{**SMALL, "mlp": mlp, **kw})).eval()


def test_every_kind_activates_the_same_mlp_parameters():
    for top_k in (1, 2):
        counts = {kind: activated_mlp_params(LMConfig(**{**SMALL, "mlp": kind, "top_k": top_k})) for kind in KINDS}
        assert len({c["experts"] for c in counts.values()}) == 1, counts
        assert counts["switch"]["router"] == 16 * 4 and counts["moex"]["router"] == 0
    # and the count matches the parameters a token actually touches
    model = _model("moex", top_k=2)
    layer = model.blocks[0].mlp
    per_expert = layer.up.weight.numel() // 4 + layer.up.bias.numel() // 4 + layer.down.weight.numel() // 4
    assert activated_mlp_params(model.config)["experts"] == 2 * per_expert + layer.down.bias.numel()
    assert parameter_counts(model)["activated"] == parameter_counts(_model("dense_relu"))["total"]


@pytest.mark.parametrize("kind", ["switch", "moex"])
def test_moe_lm_training_path_equals_the_wide_path(kind):
    model = _model(kind, top_k=2).double()
    ids = torch.randint(0, 11, (3, 12))
    wide = model(ids).logits
    model.train()
    torch.testing.assert_close(model(ids).logits, wide, rtol=0, atol=1e-10)


@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_moex_starts_as_the_dense_relu_model(top_k):
    dense = _model("dense_relu")
    cfg = LMConfig(**{**SMALL, "mlp": "moex", "top_k": top_k, "expert_hidden": dense.config.hidden})
    ids = torch.randint(0, 11, (2, 12))
    exact = upcycle(dense, cfg, noise=0.0).eval()
    torch.testing.assert_close(exact(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)
    noisy = upcycle(dense, cfg, noise=0.01).eval()
    w = noisy.blocks[0].mlp.up.weight.view(4, -1, 16)
    assert not torch.equal(w[0], w[1])  # the noise tells the experts apart
    assert (noisy(ids).logits - dense(ids).logits).abs().max() < 0.05


def test_upcycling_refuses_mismatched_shapes():
    dense = _model("dense_relu")
    with pytest.raises(FeaturekitError, match="expert_hidden must equal"):
        upcycle(dense, LMConfig(**{**SMALL, "mlp": "moex", "top_k": 2}))
    with pytest.raises(FeaturekitError, match="from a dense model"):
        upcycle(_model("moex"), LMConfig(**{**SMALL, "mlp": "moex"}))


@pytest.mark.parametrize("kind", KINDS)
def test_sites_resolve_and_capture(kind):
    model = _model(kind, top_k=2)
    ids = torch.randint(0, 11, (2, 12))
    assert "mlp_hidden.1" in valid_sites(model)
    check_site(model.config, "mlp_hidden.1")
    acts = capture_activations(model, ids, ["mlp_in.1", "mlp_hidden.1", "mlp_out.1", "attn_z.0", "resid_post.0"])
    width = 64 if kind.startswith("dense") else 4 * 32
    assert site_dim(model, "mlp_hidden.1") == width
    assert acts["mlp_hidden.1"].shape == (2, 12, width)
    mlp = model.blocks[1].mlp
    with torch.inference_mode():  # the captured tensors are inference tensors
        torch.testing.assert_close(acts["mlp_out.1"], mlp.down(acts["mlp_hidden.1"]))
        if not kind.startswith("dense"):  # the site is the wide MLP's hidden layer
            x = acts["mlp_in.1"].reshape(-1, 16)
            torch.testing.assert_close(acts["mlp_hidden.1"].reshape(-1, width), mlp.wide_hidden(x))
    if not kind.startswith("dense"):  # k of the M expert blocks are nonzero
        blocks_on = (acts["mlp_hidden.1"].view(2, 12, 4, 32) != 0).any(-1).sum(-1)
        assert (blocks_on <= 2).all()


def test_sites_are_reached_in_training_mode_too():
    model = _model("moex", top_k=2).train()
    ids = torch.randint(0, 11, (2, 12))
    acts = capture_activations(model, ids, ["mlp_hidden.0"])  # the hook switches the layer to its wide path
    assert acts["mlp_hidden.0"].shape == (2, 12, 128)
    with torch.no_grad():
        eval_logits = model.eval()(ids).logits
        model.train()
        with replace(model, "mlp_hidden.0", lambda h: h):
            torch.testing.assert_close(model(ids).logits, eval_logits)


def test_splicing_the_moex_hidden_units_changes_the_output():
    model = _model("moex")
    ids = torch.randint(0, 11, (2, 12))
    with torch.no_grad():
        base = model(ids).logits
        with replace(model, "mlp_hidden.0", lambda h: h):
            same = model(ids).logits
        with replace(model, "mlp_hidden.0", torch.zeros_like):
            ablated = model(ids).logits
    torch.testing.assert_close(same, base)
    assert (ablated - base).abs().max() > 1e-4


def test_bad_inputs():
    with pytest.raises(FeaturekitError, match="unknown mlp kind 'moe'"):
        LMConfig(vocab_size=5, mlp="moe")
    with pytest.raises(FeaturekitError, match="multiple of n_head"):
        LMConfig(vocab_size=5, d_model=10, n_head=3)
    with pytest.raises(FeaturekitError, match="longer than this model's seq_len=12"):
        _model("dense_gelu")(torch.zeros(1, 13, dtype=torch.long))
    with pytest.raises(FeaturekitError, match="unknown LM config keys"):
        LMConfig.from_dict({"vocab_size": 5, "width": 3})


def test_router_l0_correlation_rows():
    from featurekit.moex.analysis import router_l0_correlation

    ids = torch.randint(0, 11, (4, 12))
    rows = router_l0_correlation(_model("moex", top_k=2), ids)
    assert [r["layer"] for r in rows] == [0, 1] and all(r["tokens"] == 48 for r in rows)
    assert all(-1 <= r["pearson"] <= 1 and r["picked_l0"] <= 32 for r in rows)
    with pytest.raises(FeaturekitError, match="needs an MoE"):
        router_l0_correlation(_model("dense_gelu"), ids)


def test_harvest_reads_the_moex_hidden_units():
    """featurekit's harvester (what the feature store and dictionary training read) works on the LM directly."""
    from featurekit.data.harvest import harvest

    model = _model("moex", top_k=2)
    ids = torch.randint(0, 11, (5, 12))
    batches = list(harvest(model, ids, ["mlp_hidden.1"], batch_size=2, progress=False))
    acts = torch.cat([b.acts["mlp_hidden.1"] for b in batches])
    assert acts.shape == (60, 4 * 32)
    assert ((acts.view(60, 4, 32) != 0).any(-1).sum(-1) <= 2).all()


def test_autointerp_neuron_units_read_the_moex_experts():
    """autointerp's MLP-neuron units work on the moex LM: one unit per (expert, index), output directions = W_dec columns."""
    from featurekit.autointerp.units import NeuronUnits

    model = _model("moex", top_k=2)
    units = NeuronUnits(model, 1)
    assert units.n_units == 4 * 32 and units.site == "mlp_hidden.1"
    torch.testing.assert_close(units.directions[32 * 2 + 5], model.blocks[1].mlp.down.weight[:, 32 * 2 + 5].detach())


def test_generate_is_greedy_and_keeps_to_the_context():
    torch.manual_seed(0)
    model = MoexLM(LMConfig(**SMALL, mlp="moex")).eval()
    prompt = torch.randint(0, 11, (2, 10))
    out = model.generate(prompt, max_new_tokens=5, do_sample=False)
    assert out.shape == (2, 15) and torch.equal(out[:, :10], prompt)
    ids = prompt
    for _ in range(5):  # by hand: the argmax of the last position, over the last seq_len (12) tokens
        ids = torch.cat([ids, model(ids[:, -12:]).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, ids)
    with pytest.raises(FeaturekitError, match="greedy only"):
        model.generate(prompt, do_sample=True)
