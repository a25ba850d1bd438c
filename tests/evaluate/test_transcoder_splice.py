"""Transcoders spliced into a model: on a tiny GPT-2 with ReLU MLPs a transcoder built by hand from
the MLP weights IS the MLP (loss recovered 1, KL 0, every layer at once), replacements read the
input of the same forward pass; and the whole pipeline with method=transcoder on the tiny Llama."""

import json

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import featurekit
from featurekit import pipeline
from featurekit.config import load_config
from featurekit.data.harvest import harvest
from featurekit.dictionaries import SkipTranscoder, TopKSAE, Transcoder
from featurekit.errors import FeaturekitError
from featurekit.evaluate.metrics import fvu
from featurekit.evaluate.transcoders import replace_mlps, splice_transcoders, transcoder_splice_eval


@pytest.fixture(scope="module")
def gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=3, n_head=2, activation_function="relu",
                                       bos_token_id=0, eos_token_id=0))
    return model.eval()


def exact(model, layer: int, cls=Transcoder) -> Transcoder:
    """MLP(x) = ReLU(x W_fc + b_fc) W_proj + b_proj (HF Conv1D weights are (in, out)): a transcoder with
    one latent per neuron and k = all latents (TopK then ReLU = ReLU) reproduces it exactly."""
    mlp = model.transformer.h[layer].mlp
    width = mlp.c_fc.weight.shape[1]
    tc = cls(16, width, k=width, d_out=16)
    with torch.no_grad():
        tc.W_enc.copy_(mlp.c_fc.weight.T)
        tc.b_enc.copy_(mlp.c_fc.bias)
        tc.W_dec.copy_(mlp.c_proj.weight)
        tc.b_dec.copy_(mlp.c_proj.bias)
    return tc.eval()


def ids_and_mask(n=6, t=12):
    ids = torch.randint(0, 50, (n, t), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    return ids, mask


@torch.no_grad()
def test_an_exact_transcoder_recovers_all_loss_and_a_zero_one_none(gpt2):
    ids, mask = ids_and_mask()
    result = transcoder_splice_eval(gpt2, {1: exact(gpt2, 1)}, ids, mask, batch_contexts=4, progress=False)
    assert result["ce_spliced"] == pytest.approx(result["ce_clean"], abs=1e-5)
    assert result["kl_clean_spliced"] == pytest.approx(0.0, abs=1e-6) and result["loss_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert abs(result["ce_zero_ablated"] - result["ce_clean"]) > 1e-3  # zero-ablating the MLP output does change the model
    assert result["splice_tokens"] == 6 * 10 and result["spliced_sites"] == ["mlp_in.1 -> mlp_out.1"]

    zero = Transcoder(16, 8, k=2, d_out=16)  # W_dec = 0, b_dec = 0 → predicts 0 = zero-ablation
    result = transcoder_splice_eval(gpt2, {1: zero}, ids, mask, batch_contexts=4, progress=False)
    assert result["ce_spliced"] == pytest.approx(result["ce_zero_ablated"], abs=1e-5)
    assert result["loss_recovered"] == pytest.approx(0.0, abs=1e-4) and result["kl_clean_spliced"] > 0


@torch.no_grad()
def test_every_mlp_replaced_at_once_by_exact_transcoders_leaves_the_logits(gpt2):
    ids, _ = ids_and_mask()
    clean = gpt2(input_ids=ids).logits
    with replace_mlps(gpt2, {layer: exact(gpt2, layer) for layer in range(3)}):
        replaced = gpt2(input_ids=ids).logits
    torch.testing.assert_close(replaced, clean, rtol=1e-4, atol=1e-4)
    with replace_mlps(gpt2, {layer: Transcoder(16, 8, k=2, d_out=16) for layer in range(3)}):  # predicts 0
        zeroed = gpt2(input_ids=ids).logits
    handles = [block.mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out)) for block in gpt2.transformer.h]
    try:  # the same with every MLP output set to 0 by hand
        by_hand = gpt2(input_ids=ids).logits
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(zeroed, by_hand)
    result = transcoder_splice_eval(gpt2, {layer: exact(gpt2, layer) for layer in range(3)}, *ids_and_mask(), progress=False)
    assert result["kl_clean_spliced"] == pytest.approx(0.0, abs=1e-6) and result["loss_recovered"] == pytest.approx(1.0, abs=1e-4)


@torch.no_grad()
def test_each_transcoder_reads_the_input_of_the_same_forward_pass(gpt2):
    """With layer 0 replaced by a wrong transcoder, an exact transcoder at layer 1 computes the MLP of
    the CHANGED input, i.e. it changes nothing more (a cached clean input would)."""
    ids, _ = ids_and_mask()
    wrong = exact(gpt2, 0, SkipTranscoder)
    with torch.no_grad():
        wrong.W_skip.normal_(generator=torch.Generator().manual_seed(3))
    with replace_mlps(gpt2, {0: wrong}):
        only_first = gpt2(input_ids=ids).logits
    with replace_mlps(gpt2, {0: wrong, 1: exact(gpt2, 1)}):
        both = gpt2(input_ids=ids).logits
    assert not torch.allclose(only_first, gpt2(input_ids=ids).logits, atol=1e-3)
    torch.testing.assert_close(both, only_first, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_only_kept_positions_are_replaced(gpt2):
    ids, _ = ids_and_mask(2)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, 5] = True
    clean = gpt2(input_ids=ids).logits
    with splice_transcoders(gpt2, [("mlp_in.2", "mlp_out.2", Transcoder(16, 8, k=2, d_out=16))], keep):
        edited = gpt2(input_ids=ids).logits
    assert torch.equal(edited[:, :5], clean[:, :5]) and not torch.allclose(edited[:, 5:], clean[:, 5:])


def test_wrong_dictionaries_are_refused(gpt2):
    ids, mask = ids_and_mask()
    with pytest.raises(FeaturekitError, match="not a transcoder"):
        transcoder_splice_eval(gpt2, {1: TopKSAE(16, 8, k=2)}, ids, mask, progress=False)
    tc = exact(gpt2, 1)
    tc.metadata = {"source": {"site": "mlp_in.2", "output_site": "mlp_out.2"}}
    with pytest.raises(FeaturekitError, match="trained on mlp_in.2"):
        transcoder_splice_eval(gpt2, {1: tc}, ids, mask, progress=False)


# -- the pipeline ---------------------------------------------------------------------------------
def config(tiny, tmp_path, *extra):
    return pipeline.resolve(load_config(None, [
        f"out_dir={tmp_path}", f"model.name={tiny / 'model'}", "model.dtype=float32", f"data.source={tiny / 'text.txt'}",
        "site=mlp_in.1", "data.context_len=16", "data.train_tokens=4000", "data.shard_tokens=1000",
        "dictionary.n_latents=64", "dictionary.k=4", "train.batch_size=256", "train.buffer_tokens=1024", "train.lr=1e-2",
        "train.epochs=2", "train.log_every=5", "eval.tokens=600", "eval.splice_contexts=8", "eval.batch_contexts=8",
        "report.n_features=3", *extra,
    ]))


@pytest.mark.parametrize("method,cache", [("transcoder", True), ("skiptranscoder", False)])
def test_tiny_model_end_to_end(tiny, tmp_path, method, cache):
    cfg = config(tiny, tmp_path, "name=r", f"dictionary.method={method}", f"data.cache={str(cache).lower()}")
    assert cfg.output_site == "mlp_out.1"  # derived from site=mlp_in.1
    report = pipeline.run_all(cfg, progress=False)
    run = cfg.run_dir
    assert report.is_file() and json.loads((run / "config.json").read_text())["output_site"] == "mlp_out.1"
    if cache:
        manifest = json.loads((run / "activations" / "manifest.json").read_text())
        assert sorted(manifest["sites"]) == ["mlp_in.1", "mlp_out.1"]  # one harvest pass, both sites
    result = json.loads((run / "eval.json").read_text())
    assert result["output_site"] == "mlp_out.1" and result["spliced_sites"] == ["mlp_in.1 -> mlp_out.1"]
    lr = (result["ce_zero_ablated"] - result["ce_spliced"]) / (result["ce_zero_ablated"] - result["ce_clean"])
    assert result["loss_recovered"] == pytest.approx(lr) and result["kl_clean_spliced"] >= 0
    assert 0 < result["l0"] <= 4 and result["n_tokens"] <= 600

    tc = featurekit.load(run / "dictionary")
    assert tc.method == method and tc.metadata["source"]["output_site"] == "mlp_out.1" and tc.metadata["d_out"] == 32
    assert tc.metadata["normalization"]["folded"] and "c_out" in tc.metadata["normalization"]["rule"]
    # eval.json's FVU is the FVU of the MLP output predicted from the MLP input, on the held-out tokens
    loaded = pipeline.open_model(cfg)
    ids, mask = pipeline.contexts(loaded, cfg, "test", cfg.eval.tokens)
    batches = list(harvest(loaded.model, ids, ["mlp_in.1", "mlp_out.1"], batch_size=8, mask=mask, progress=False,
                           max_norm_multiple=cfg.data.max_norm_multiple))
    x = torch.cat([b.acts["mlp_in.1"] for b in batches])
    y = torch.cat([b.acts["mlp_out.1"] for b in batches])
    with torch.no_grad():
        assert result["fvu"] == pytest.approx(fvu(y, tc.reconstruct(x)), rel=1e-4)
    assert result["fvu"] < 0.5  # it learned (predicting the mean gives 1)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["fvu"] < rows[0]["fvu"]


def test_output_site_is_checked(tiny, tmp_path):
    with pytest.raises(FeaturekitError, match="set output_site"):
        config(tiny, tmp_path, "dictionary.method=transcoder", "site=resid_post.1")
    with pytest.raises(FeaturekitError, match="drop output_site"):
        config(tiny, tmp_path, "dictionary.method=topk", "output_site=mlp_out.1")
    cfg = config(tiny, tmp_path, "dictionary.method=transcoder", "site=resid_post.0", "output_site=mlp_out.1")
    assert (cfg.site, cfg.output_site) == ("resid_post.0", "mlp_out.1")
