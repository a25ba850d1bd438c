import pytest
import torch

from featurekit.errors import FeaturekitError
from featurekit.models.hooks import capture_activations
from featurekit.models.sites import KINDS, Site, blocks, check_site, detect_family, family_of, parse_site, resolve, site_dim, valid_sites

N_LAYERS = 3


def test_parse_site_round_trip():
    site = parse_site("mlp_hidden.12")
    assert site == Site("mlp_hidden", 12)
    assert str(site) == "mlp_hidden.12"
    assert parse_site(site) is site


@pytest.mark.parametrize("bad", ["resid_post", "resid.3", "resid_post.-1", "resid_post.x", "", "mlp_out.1.2"])
def test_parse_site_bad_syntax_shows_grammar(bad):
    with pytest.raises(FeaturekitError, match=r"<kind>\.<layer>.*resid_pre.*attn_out"):
        parse_site(bad)


@pytest.mark.parametrize("model_type,family", [
    ("llama", "llama"), ("smollm", "llama"), ("mistral", "llama"), ("qwen2", "llama"), ("gemma", "gemma"),
    ("gemma2", "gemma"), ("gemma3", "gemma"), ("gemma3_text", "gemma"), ("gpt2", "gpt2"),
    ("gpt_neox", "neox"), ("bert", "bert")])
def test_detect_family(model_type, family):
    class Config:
        pass

    config = Config()
    config.model_type = model_type
    assert detect_family(config) == family


def test_unknown_family_lists_supported():
    class Config:
        model_type = "t5"

    with pytest.raises(FeaturekitError, match=r"'t5'.*gpt2.*llama"):
        detect_family(Config())


def test_family_and_valid_sites(family_model, expected_family):
    name, model = family_model
    assert family_of(model) == expected_family[name]
    sites = valid_sites(model)
    assert len(sites) == N_LAYERS * len(KINDS)
    assert "resid_pre.0" in sites and f"attn_out.{N_LAYERS - 1}" in sites
    assert len(blocks(model)) == N_LAYERS


def test_capture_every_site_has_the_right_width(family_model, ids):
    _, model = family_model
    sites = valid_sites(model)
    acts = capture_activations(model, ids, sites)
    assert list(acts) == sites
    for site, act in acts.items():
        assert act.shape == (*ids.shape, site_dim(model, site)), site
        assert torch.isfinite(act).all()
    d = model.config.hidden_size
    assert site_dim(model, "resid_post.0") == d
    d_mlp = getattr(model.config, "intermediate_size", None) or 4 * d  # GPT-2: n_inner defaults to 4 d
    assert site_dim(model, "mlp_hidden.1") == d_mlp


def test_gemma3_attn_z_width_uses_head_dim(tiny_model):
    model = tiny_model("gemma3")
    assert site_dim(model, "attn_z.0") == 4 * 16
    assert site_dim(model, "attn_out.0") == 32


def test_resid_sites_match_hidden_states(family_model, ids):
    _, model = family_model
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    sites = [f"resid_pre.{L}" for L in range(N_LAYERS)] + [f"resid_post.{L}" for L in range(N_LAYERS - 1)]
    acts = capture_activations(model, ids, sites)
    for L in range(N_LAYERS):
        torch.testing.assert_close(acts[f"resid_pre.{L}"], hidden[L], rtol=0, atol=1e-6)
    for L in range(N_LAYERS - 1):  # the last entry of hidden_states is final-normed in HF
        torch.testing.assert_close(acts[f"resid_post.{L}"], hidden[L + 1], rtol=0, atol=1e-6)


def test_residual_decomposition(tiny_model, ids):
    """resid_post = resid_pre + attn_out + mlp_out for pre-norm models (what the sites promise)."""
    for name in ("llama", "gemma3", "gpt2", "neox"):
        model = tiny_model(name)
        acts = capture_activations(model, ids, ["resid_pre.1", "attn_out.1", "mlp_out.1", "resid_post.1"])
        total = acts["resid_pre.1"] + acts["attn_out.1"] + acts["mlp_out.1"]
        torch.testing.assert_close(acts["resid_post.1"], total, rtol=1e-5, atol=1e-5, msg=name)


def test_mlp_hidden_and_attn_z_feed_the_projections(tiny_model, ids):
    model = tiny_model("llama")
    acts = capture_activations(model, ids, ["mlp_hidden.0", "mlp_out.0", "attn_z.0", "attn_out.0"])
    layer = model.model.layers[0]
    with torch.no_grad():
        torch.testing.assert_close(layer.mlp.down_proj(acts["mlp_hidden.0"]), acts["mlp_out.0"])
        torch.testing.assert_close(layer.self_attn.o_proj(acts["attn_z.0"]), acts["attn_out.0"])


def test_bert_sites(tiny_model, ids):
    model = tiny_model("bert")
    acts = capture_activations(model, ids, ["mlp_in.0", "mlp_out.0", "resid_post.0", "attn_out.0", "resid_pre.0"])
    layer = model.encoder.layer[0]
    with torch.no_grad():
        # post-norm: resid_post = LayerNorm(mlp_out + mlp_in); mlp_in = LayerNorm(attn_out + resid_pre)
        torch.testing.assert_close(layer.output.LayerNorm(acts["mlp_out.0"] + acts["mlp_in.0"]), acts["resid_post.0"])
        torch.testing.assert_close(layer.attention.output.LayerNorm(acts["attn_out.0"] + acts["resid_pre.0"]),
                                   acts["mlp_in.0"])


@pytest.mark.parametrize("site,pattern", [
    ("resid_post.3", r"out of range.*layer 0\.\.2"),
    ("resid_post.99", r"out of range.*resid_pre, resid_post"),
    ("neurons.1", r"bad site name.*layer 0\.\.2"),
    ("resid_post", r"bad site name.*mlp_hidden"),
])
def test_unknown_site_lists_valid_sites(family_model, site, pattern):
    _, model = family_model
    with pytest.raises(FeaturekitError, match=pattern):
        resolve(model, site)
    with pytest.raises(FeaturekitError, match=pattern):
        capture_activations(model, torch.zeros(1, 3, dtype=torch.long), [site])


@pytest.mark.parametrize("site", ["resid_post.3", "resid_post.99", "neurons.1", "resid_post", "mlp_hidden.-1"])
def test_check_site_from_config_fails_as_resolve_does(family_model, site):
    """check_site reads only the config (before any weights load) and gives resolve's message."""
    _, model = family_model
    with pytest.raises(FeaturekitError) as from_model:
        resolve(model, site)
    with pytest.raises(FeaturekitError) as from_config:
        check_site(model.config, site)
    assert str(from_config.value) == str(from_model.value)


def test_check_site_accepts_every_valid_site(family_model):
    _, model = family_model
    for site in valid_sites(model):
        assert str(check_site(model.config, site)) == site


def test_check_site_unknown_family():
    class Config:
        model_type = "t5"
        num_hidden_layers = 2

        def get_text_config(self):
            return self

    with pytest.raises(FeaturekitError, match=r"unsupported model type 't5'"):
        check_site(Config(), "resid_post.0")
