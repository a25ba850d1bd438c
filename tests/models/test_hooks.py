import pytest
import torch

from featurekit.errors import FeaturekitError
from featurekit.models.hooks import add, capture_activations, replace
from featurekit.models.sites import KINDS, blocks, site_dim, valid_sites

N_LAYERS = 3


def _hook_counts(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_identity_splice_is_exact_and_zeros_change_output(family_model, ids, output_of):
    _, model = family_model
    clean = output_of(model, ids)
    n_hooks = _hook_counts(model)
    for site in valid_sites(model):
        with replace(model, site, lambda a: a.clone()):
            assert torch.equal(output_of(model, ids), clean), site
        with replace(model, site, torch.zeros_like):
            assert not torch.allclose(output_of(model, ids), clean, rtol=0, atol=1e-6), site
    assert _hook_counts(model) == n_hooks
    assert torch.equal(output_of(model, ids), clean)


def test_add_changes_output(family_model, ids, output_of):
    _, model = family_model
    clean = output_of(model, ids)
    for kind in KINDS:
        site = f"{kind}.1"
        vector = torch.randn(site_dim(model, site))  # not ones: LayerNorm removes the all-ones direction
        with add(model, site, vector, scale=3.0):
            assert not torch.allclose(output_of(model, ids), clean, rtol=0, atol=1e-6), site
        with add(model, site, vector, scale=0.0):
            torch.testing.assert_close(output_of(model, ids), clean, rtol=0, atol=1e-6)
    assert torch.equal(output_of(model, ids), clean)


def test_add_equals_replace_with_shift(tiny_model, ids, output_of):
    model = tiny_model("llama")
    vector = torch.randn(32)
    with add(model, "resid_post.0", vector, scale=2.0):
        steered = output_of(model, ids)
    with replace(model, "resid_post.0", lambda a: a + 2.0 * vector):
        spliced = output_of(model, ids)
    assert torch.equal(steered, spliced)


def test_add_at_positions_leaves_earlier_positions_alone(tiny_model, ids, output_of):
    model = tiny_model("llama")
    clean = output_of(model, ids)
    with add(model, "resid_pre.1", torch.ones(32), scale=5.0, positions=[5, 6]):
        steered = output_of(model, ids)
    torch.testing.assert_close(steered[:, :5], clean[:, :5], rtol=0, atol=1e-6)  # causal: earlier tokens unaffected
    assert not torch.allclose(steered[:, 5:], clean[:, 5:])


def test_hooks_removed_when_body_raises(tiny_model, ids, output_of):
    model = tiny_model("gpt2")
    clean = output_of(model, ids)
    n_hooks = _hook_counts(model)
    with pytest.raises(RuntimeError, match="boom"):
        with replace(model, "mlp_out.0", torch.zeros_like):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with add(model, "attn_z.1", torch.ones(32)):
            raise RuntimeError("boom")
    assert _hook_counts(model) == n_hooks
    assert torch.equal(output_of(model, ids), clean)


def test_replace_wrong_shape_is_a_clear_error(tiny_model, ids, output_of):
    model = tiny_model("llama")
    n_hooks = _hook_counts(model)
    with pytest.raises(FeaturekitError, match="shape"):
        with replace(model, "resid_post.0", lambda a: a[..., :3]):
            output_of(model, ids)
    with pytest.raises(FeaturekitError, match="width"):
        with add(model, "mlp_hidden.0", torch.ones(32)):
            output_of(model, ids)
    assert _hook_counts(model) == n_hooks


def test_replace_casts_to_model_dtype(tiny_model, ids):
    model = tiny_model("llama")
    seen = {}
    with replace(model, "resid_post.0", lambda a: a.double()):
        acts = capture_activations(model, ids, ["resid_post.0"])
    seen["dtype"] = acts["resid_post.0"].dtype
    assert seen["dtype"] == torch.float32


@pytest.mark.parametrize("kind", KINDS)
def test_capture_stops_after_deepest_block(family_model, ids, kind):
    name, model = family_model
    calls = {i: 0 for i in range(N_LAYERS)}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: calls.__setitem__(i, calls[i] + 1))
               for i, b in enumerate(blocks(model))]
    head_calls = []
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        handles.append(head.register_forward_hook(lambda m, a, o: head_calls.append(1)))
    n_hooks = _hook_counts(model)
    try:
        acts = capture_activations(model, ids, [f"{kind}.0", "resid_pre.1"])
    finally:
        for h in handles:
            h.remove()
    assert set(acts) == {f"{kind}.0", "resid_pre.1"}
    # resid_pre.1 is read on entering block 1, which then stops; block 2 and the head never run
    assert calls == {0: 1, 1: 1, 2: 0}, name
    assert head_calls == []
    assert _hook_counts(model) == n_hooks - len(handles)


def test_capture_runs_one_forward_for_many_sites(family_model, ids):
    _, model = family_model
    embed = model.get_input_embeddings()
    n = []
    h = embed.register_forward_hook(lambda m, a, o: n.append(1))
    try:
        acts = capture_activations(model, ids, valid_sites(model))
    finally:
        h.remove()
    assert len(n) == 1 and len(acts) == N_LAYERS * len(KINDS)


def test_capture_with_attention_mask_and_loaded_model_wrapper(tiny_model, ids):
    from featurekit.models.loading import LoadedModel

    model = tiny_model("llama")
    wrapped = LoadedModel(model=model, tokenizer=None, name="tiny", family="llama", n_layers=3, d_model=32)
    plain = capture_activations(model, ids, ["mlp_out.2"])
    masked = capture_activations(wrapped, ids, ["mlp_out.2"], attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(plain["mlp_out.2"], masked["mlp_out.2"])


def test_capture_needs_a_site(tiny_model, ids):
    with pytest.raises(FeaturekitError, match="at least one site"):
        capture_activations(tiny_model("llama"), ids, [])


def test_capture_context_reads_during_a_full_forward():
    from transformers import LlamaConfig, LlamaForCausalLM

    from featurekit.models.hooks import capture

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    ids = torch.randint(0, 64, (2, 7))
    model(input_ids=ids, output_hidden_states=True)  # let transformers install its own hooks first
    before = len(model.model.layers[0]._forward_hooks)
    with torch.no_grad(), capture(model, "resid_post.0", "mlp_hidden.1") as seen:
        out = model(input_ids=ids, output_hidden_states=True)
    assert torch.equal(seen["resid_post.0"], out.hidden_states[1])
    assert seen["mlp_hidden.1"].shape == (2, 7, 64)
    assert len(model.model.layers[0]._forward_hooks) == before  # our hooks are removed on exit


@pytest.mark.parametrize("name,site", [("gpt2", "resid_post.1"), ("gpt2", "mlp_in.0"), ("neox", "mlp_hidden.2")])
def test_capture_gradients_match_finite_differences(tiny_model, name, site):
    """The captured gradient is d(Σ_t CE_t)/d(activation): checked by central differences in float64
    on a few coordinates, with `add` at one position (an independent path through the model).
    (Llama's RMSNorm computes in float32 even in a float64 model, too coarse for differences.)"""
    from featurekit.models.hooks import capture_gradients

    model = tiny_model(name).double()
    try:
        ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
        acts, grads = capture_gradients(model, ids, [site])
        assert acts[site].shape == grads[site].shape == (2, 6, site_dim(model, site))

        def loss(b: int, t: int, j: int, eps: float) -> float:
            vector = torch.zeros(grads[site].shape[-1], dtype=torch.float64)
            vector[j] = eps
            with add(model, site, vector, positions=[t]), torch.no_grad():
                logits = model(input_ids=ids[b:b + 1]).logits
            return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[b, 1:], reduction="sum"))

        for b, t, j in [(0, 0, 0), (1, 2, 5), (0, 4, 7), (1, 5, 3)]:
            numeric = (loss(b, t, j, 1e-5) - loss(b, t, j, -1e-5)) / 2e-5
            assert float(grads[site][b, t, j]) == pytest.approx(numeric, rel=1e-5, abs=1e-8)
    finally:
        model.float()


def test_capture_gradients_on_llama_equal_autograd_through_a_splice(tiny_model):
    """Llama family: the gradient equals d loss / d delta for x + delta spliced in at the site, per context."""
    from featurekit.models.hooks import capture_gradients

    model = tiny_model("llama")
    hooks_before = _hook_counts(model)  # transformers keeps its own output-recording hooks once hidden states were asked for
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    acts, grads = capture_gradients(model, ids, ["resid_post.1", "mlp_hidden.0"])
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient is kept
    with torch.no_grad():
        clean = capture_activations(model, ids, ["resid_post.1"])["resid_post.1"]
    assert torch.equal(acts["resid_post.1"], clean)
    for b in range(2):
        delta = torch.zeros(1, 6, 32, requires_grad=True)
        with replace(model, "resid_post.1", lambda a, delta=delta: a + delta):
            logits = model(input_ids=ids[b:b + 1]).logits
        (expected,) = torch.autograd.grad(torch.nn.functional.cross_entropy(logits[0, :-1], ids[b, 1:], reduction="sum"), delta)
        assert torch.allclose(grads["resid_post.1"][b], expected[0], atol=1e-6)
    assert grads["mlp_hidden.0"].shape == (2, 6, 64) and grads["mlp_hidden.0"].abs().sum() > 0
    assert _hook_counts(model) == hooks_before  # ours are all removed
