"""Other libraries' names for model places ↔ featurekit sites."""

from __future__ import annotations

import pytest

from featurekit.interop.hooks import hook_from_site, hookpoint_from_site, site_from_hook, sites_from_hookpoint


@pytest.mark.parametrize("hook,site", [
    ("blocks.6.hook_resid_post", "resid_post.6"), ("blocks.0.hook_resid_pre", "resid_pre.0"),
    ("blocks.12.hook_mlp_out", "mlp_out.12"), ("blocks.3.attn.hook_z", "attn_z.3"), ("blocks.3.hook_attn_out", "attn_out.3"),
    ("blocks.5.ln2.hook_normalized", "mlp_in.5"), ("blocks.5.mlp.hook_post", "mlp_hidden.5"),
])
def test_transformerlens_hooks_and_sites_map_both_ways(hook, site):
    assert site_from_hook(hook) == site and hook_from_site(site) == hook


@pytest.mark.parametrize("hook", ["blocks.6.hook_resid_mid", "blocks.6.hook_mlp_in", "hook_embed", "blocks.x.hook_resid_post", None])
def test_hooks_without_a_featurekit_site_give_none(hook):
    assert site_from_hook(hook) is None


@pytest.mark.parametrize("hookpoint,transcoder,sites", [
    ("layers.6", False, ("resid_post.6", None)), ("layers.6.mlp", False, ("mlp_out.6", None)),
    ("layers.6.mlp", True, ("mlp_in.6", "mlp_out.6")), ("model.layers.2.self_attn", False, ("attn_out.2", None)),
    ("h.4.mlp", True, ("mlp_in.4", "mlp_out.4")), ("gpt_neox.layers.1", False, ("resid_post.1", None)),
    ("layers.6", True, ("resid_pre.6", "resid_post.6")), ("embed_tokens", False, (None, None)),
])
def test_sparsify_hookpoints_map_to_sites(hookpoint, transcoder, sites):
    assert sites_from_hookpoint(hookpoint, transcoder) == sites


def test_sites_map_back_to_hookpoints():
    assert hookpoint_from_site("resid_post.3") == "layers.3"
    assert hookpoint_from_site("mlp_in.3", "mlp_out.3") == "layers.3.mlp"
    assert hookpoint_from_site("mlp_in.3", "mlp_out.4") is None  # sparsify's transcoder reads one module's input and output
    assert hookpoint_from_site("mlp_hidden.3") is None
