import pytest
import torch

from featurekit.data.batch import ActivationBatch
from featurekit.data.harvest import choose_dtype, harvest
from featurekit.errors import FeaturekitError
from featurekit.models.hooks import capture_activations

SITES = ["resid_post.0", "mlp_hidden.1", "attn_z.0"]


@pytest.fixture(scope="module")
def tiny_llama():
    """A random-weight 2-layer Llama (d_model 64, vocab 512) in eval mode; no download."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (5, 9), generator=g)
    mask = torch.rand(5, 9, generator=g) > 0.3
    mask[:, 0] = False  # like excluding BOS
    mask[2] = False  # a whole context dropped
    return ids, mask


def _concat(batches):
    return ActivationBatch(
        acts={s: torch.cat([b.acts[s] for b in batches]) for s in batches[0].acts},
        token_ids=torch.cat([b.token_ids for b in batches]),
        context_idx=torch.cat([b.context_idx for b in batches]),
        position=torch.cat([b.position for b in batches]))


def test_harvest_keeps_masked_tokens_with_provenance(tiny_llama, data):
    ids, mask = data
    batches = list(harvest(tiny_llama, ids, SITES, batch_size=2, mask=mask, progress=False))
    assert len(batches) == 3 and all(isinstance(b, ActivationBatch) for b in batches)
    out = _concat(batches)
    n = int(mask.sum())
    assert out.n_tokens == n == sum(b.n_tokens for b in batches)
    rows, cols = mask.nonzero(as_tuple=True)
    assert torch.equal(out.context_idx, rows) and torch.equal(out.position, cols)
    assert torch.equal(out.token_ids, ids[rows, cols])
    assert not (out.position == 0).any() and not (out.context_idx == 2).any()
    assert out.token_ids.dtype == out.context_idx.dtype == out.position.dtype == torch.int64
    direct = capture_activations(tiny_llama, ids, SITES)
    for site in SITES:
        assert out.acts[site].shape == (n, direct[site].shape[-1])
        assert out.acts[site].dtype == torch.float32
        torch.testing.assert_close(out.acts[site], direct[site][mask], rtol=1e-5, atol=1e-5)
    out.acts["resid_post.0"] -= 1.0  # normal tensors: consumers may edit them in place


def test_harvest_one_forward_per_batch_and_skips_empty_batches(tiny_llama, data):
    ids, mask = data
    mask[4] = False  # the last batch (context 4 alone) is now empty
    calls = []
    h = tiny_llama.get_input_embeddings().register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        batches = list(harvest(tiny_llama, ids, SITES, batch_size=2, mask=mask, progress=False))
    finally:
        h.remove()
    assert calls == [2, 2] and len(batches) == 2


def test_harvest_without_mask_keeps_everything(tiny_llama, data, capsys):
    ids, _ = data
    batches = list(harvest(tiny_llama, ids, ["resid_pre.1"], batch_size=4, progress=True))
    assert sum(b.n_tokens for b in batches) == ids.numel()
    assert "tok" in capsys.readouterr().err  # tqdm bar with a tokens/s rate


def test_harvest_keeps_bfloat16(tiny_llama, data):
    ids, mask = data
    model = tiny_llama.to(torch.bfloat16)
    try:
        batch = next(harvest(model, ids, ["mlp_hidden.0"], batch_size=8, mask=mask, progress=False))
    finally:
        tiny_llama.to(torch.float32)
    assert batch.acts["mlp_hidden.0"].dtype == torch.bfloat16


def test_harvest_checks_inputs(tiny_llama, data):
    ids, mask = data
    with pytest.raises(FeaturekitError, match="shape"):
        next(harvest(tiny_llama, ids[0], SITES, batch_size=2, progress=False))
    with pytest.raises(FeaturekitError, match="mask"):
        next(harvest(tiny_llama, ids, SITES, batch_size=2, mask=mask[:, :3], progress=False))
    with pytest.raises(FeaturekitError, match="bad site"):
        next(harvest(tiny_llama, ids, ["neurons.0"], batch_size=2, mask=mask, progress=False))


def test_choose_dtype():
    assert choose_dtype("float32") is torch.float32
    assert choose_dtype("bf16") is torch.bfloat16
    assert choose_dtype("torch.float16") is torch.float16
    assert choose_dtype("auto", device="cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(FeaturekitError, match="auto"):
        choose_dtype("int8")


def test_norm_outliers_are_dropped_at_every_site():
    from featurekit.data.harvest import norm_outliers

    acts = torch.ones(2, 5, 3)
    acts[0, 1] = 1000.0  # an attention-sink-like token
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[1, 0] = False
    out = norm_outliers(acts, keep, 10.0)
    assert out.sum() == 1 and out[0, 1]
    assert not norm_outliers(acts, keep, None).any()
