"""Several dictionaries spliced into one forward pass (evaluate/splice_layers.py, `featurekit eval ... --suite splice_all`)
on the tiny random Llama: identity dictionaries change nothing (ΔCE 0, KL 0) and so does the curve of every subset;
all at once equals splicing by hand with nested hooks; mean-ablation uses the sites' means; runs of other models
and two dictionaries at one site are refused with the reason."""

import json

import pytest
import torch

from featurekit.cli import main
from featurekit.dictionaries import TopKSAE, Transcoder, fileformat
from featurekit.errors import FeaturekitError
from featurekit.evaluate import metrics
from featurekit.evaluate.splice_layers import Splice, layer_curves, site_means
from featurekit.models.hooks import replace
from featurekit.models.loading import load_model
from featurekit.pipeline.splice_layers import read_splices

D = 32  # the tiny model's width


def identity(d: int = D) -> TopKSAE:
    """x = ReLU(x) − ReLU(−x): latents ±e_i, every one kept (k = 2d), decoder rows ±e_i."""
    sae = TopKSAE(d, 2 * d, k=2 * d)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye]))
        sae.W_dec.copy_(torch.cat([eye, -eye]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def random_sae(seed: int) -> TopKSAE:
    torch.manual_seed(seed)
    return TopKSAE(D, 64, k=4).eval()


def random_transcoder(seed: int) -> Transcoder:
    torch.manual_seed(seed)
    tc = Transcoder(D, 48, k=4, d_out=D)
    with torch.no_grad():
        tc.W_dec.normal_(0, 0.3)
    return tc.eval()


@pytest.fixture(scope="module")
def model(tiny):
    return load_model(str(tiny / "model"), dtype=torch.float32).model


def ids_and_mask():
    ids = torch.randint(4, 30, (4, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 0] = False
    return ids, mask


def test_identity_dictionaries_change_nothing_all_at_once_alone_or_cumulatively(model):
    ids, mask = ids_and_mask()
    splices = [Splice(f"L{layer}", f"resid_post.{layer}", f"resid_post.{layer}", identity()) for layer in (2, 0, 1)]
    result = layer_curves(model, splices, ids, mask, batch_contexts=2, progress=False)
    assert result["order"] == ["L0", "L1", "L2"]  # by layer
    for scores in [result["all"], *result["alone"], *result["cumulative"]]:
        assert scores["delta_ce"] == pytest.approx(0.0, abs=1e-4)
        assert scores["kl_clean_spliced"] == pytest.approx(0.0, abs=1e-5)
        assert scores["loss_recovered"] == pytest.approx(1.0, abs=1e-3)
        assert scores["ce_ablated"] != scores["ce_clean"] and scores["splice_tokens"] == 4 * 10
    assert result["cumulative"][-1] == result["all"]


@torch.no_grad()
def test_all_at_once_equals_splicing_by_hand(model):
    ids, _ = ids_and_mask()
    every = torch.ones_like(ids, dtype=torch.bool)  # splice every position, as the hooks by hand do
    sae0, tc1, sae2 = random_sae(1), random_transcoder(2), random_sae(3)
    splices = [Splice("a", "resid_post.0", "resid_post.0", sae0), Splice("b", "mlp_in.1", "mlp_out.1", tc1),
               Splice("c", "resid_post.2", "resid_post.2", sae2)]
    result = layer_curves(model, splices, ids, every, batch_contexts=4, progress=False)
    seen = {}
    mlp = model.model.layers[1].mlp
    handles = [mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("m", args[0])),
               mlp.register_forward_hook(lambda m, a, out: tc1.reconstruct(seen["m"]))]
    try:  # by hand: SAE reconstructions at the two residual sites, MLP 1's output replaced by the transcoder's prediction
        with replace(model, "resid_post.0", sae0.reconstruct), replace(model, "resid_post.2", sae2.reconstruct):
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    clean = model(input_ids=ids).logits
    ce = float(metrics.token_cross_entropy(logits, ids)[:, :-1].double().mean())
    kl = float(metrics.token_kl(clean, logits)[:, :-1].double().mean())
    assert result["all"]["ce_spliced"] == pytest.approx(ce, rel=1e-4)  # float32 rounding of batched matmuls
    assert result["all"]["kl_clean_spliced"] == pytest.approx(kl, rel=1e-3) and kl > 1e-3
    assert result["cumulative"][-1] == result["all"] and result["alone"][0] == result["cumulative"][0]
    assert result["alone"][1] != result["cumulative"][1]


@torch.no_grad()
def test_mean_ablation_sets_each_site_to_its_mean(model):
    ids, mask = ids_and_mask()
    means = site_means(model, ["resid_post.1"], ids, mask, batch_contexts=2)
    constant = TopKSAE(D, 4, k=1)  # W_dec = 0: reconstructs b_dec, here the site's mean → the same as mean-ablation
    with torch.no_grad():
        constant.W_dec.zero_()
        constant.b_dec.copy_(means["resid_post.1"])
    result = layer_curves(model, [Splice("m", "resid_post.1", "resid_post.1", constant.eval())], ids, mask, ablation="mean",
                          batch_contexts=2, progress=False)
    assert result["all"]["ce_spliced"] == pytest.approx(result["all"]["ce_ablated"], rel=1e-5)
    assert result["all"]["loss_recovered"] == pytest.approx(0.0, abs=1e-3) and result["ablation"] == "mean"
    with pytest.raises(FeaturekitError, match="ablation"):
        layer_curves(model, [Splice("m", "resid_post.1", "resid_post.1", constant)], ids, mask, ablation="median")


def save(dictionary, folder, model, site, output_site=None):
    source = {"model": model, "site": site, **({"output_site": output_site} if output_site else {})}
    return fileformat.save(dictionary, folder, metadata={"source": source})


def test_bad_inputs_are_refused_with_the_reason(tiny, tmp_path):
    model = str(tiny / "model")
    a = save(identity(), tmp_path / "a", model, "resid_post.0")
    b = save(identity(), tmp_path / "b", model, "resid_post.0")
    other = save(identity(), tmp_path / "other", "some-other-model", "resid_post.1")
    with pytest.raises(FeaturekitError, match="both write resid_post.0"):
        read_splices([a, b])
    with pytest.raises(FeaturekitError, match="only dictionaries of one model"):
        read_splices([a, other])
    with pytest.raises(FeaturekitError, match="holds no dictionary"):
        read_splices([tmp_path])
    with pytest.raises(FeaturekitError, match="cannot read"):
        read_splices([save(random_sae(0), tmp_path / "c", model, "mlp_in.1", "mlp_out.1")])


def test_the_command_writes_saebench_json_and_a_plot(tiny, tmp_path, capsys):
    """A folder of layer_L transcoders (a set still being trained) plus an SAE folder, through the CLI."""
    model = str(tiny / "model")
    for layer in (0, 1):
        save(random_transcoder(layer), tmp_path / "set" / f"layer_{layer}", model, f"mlp_in.{layer}", f"mlp_out.{layer}")
    save(identity(), tmp_path / "sae2", model, "resid_post.2")
    cmd = ["eval", str(tmp_path / "set"), str(tmp_path / "sae2"), "--suite", "splice_all", "--set", f"data.source={tiny / 'text.txt'}",
           "--set", "eval.splice_contexts=3", "--set", "data.context_len=16", "--quiet"]
    assert main(cmd) == 0  # in-process: quicker
    out = json.loads((tmp_path / "set" / "evals" / "splice_all.json").read_text())
    assert out["eval_type_id"] == "splice_all" and {"eval_config", "eval_id", "datetime_epoch_millis", "eval_result_details",
                                                    "sae_cfg_dict"} <= set(out)
    assert [d["output_site"] for d in out["eval_result_details"]] == ["mlp_out.0", "mlp_out.1", "resid_post.2"]
    last = out["eval_result_details"][-1]
    assert last["alone"]["delta_ce"] == pytest.approx(0.0, abs=1e-4)  # the identity SAE alone
    assert last["cumulative"]["ce_spliced"] == pytest.approx(out["eval_result_metrics"]["all"]["ce_spliced"])
    assert (tmp_path / "set" / "evals" / "splice_all.png").stat().st_size > 1000
    assert "all at once" in capsys.readouterr().out
    assert main(cmd[:3] + ["--suite", "splice_all,probing"]) != 0
    assert "runs on its own" in capsys.readouterr().err
    assert main(cmd[:3] + ["--suite", "probing"]) != 0
    assert "only --suite splice_all takes several" in capsys.readouterr().err


def test_only_the_curves_asked_for_are_scored(model):
    from featurekit.config.checks import splice_curves

    ids, mask = ids_and_mask()
    splices = [Splice(f"L{layer}", f"resid_post.{layer}", f"resid_post.{layer}", random_sae(layer)) for layer in (0, 1)]
    both = layer_curves(model, splices, ids, mask, batch_contexts=4, progress=False)
    cumulative = layer_curves(model, splices, ids, mask, batch_contexts=4, progress=False, curves=["cumulative"])
    assert "alone" not in cumulative and cumulative["cumulative"] == both["cumulative"] and cumulative["all"] == both["all"]
    assert splice_curves("alone, cumulative") == ["alone", "cumulative"] and splice_curves("") == []
    with pytest.raises(FeaturekitError, match="eval.splice_curves"):
        splice_curves("alone,prefix")
