"""Transcoder sets in one command on the tiny Llama (`featurekit circuits train-set`): a per-layer set trained layer
by layer (scratch runs deleted, finished layers skipped on a rerun), a CLT trained jointly, both loaded by
circuits.transcoder_set and scored by `featurekit circuits quality` (every MLP replaced at once); CLT set files."""

import copy
import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from featurekit import cli, rundir
from featurekit._io import read_json
from featurekit.circuits import quality, replacement, transcoder_set
from featurekit.dictionaries import CrossLayerTranscoder, Transcoder
from featurekit.errors import FeaturekitError
from featurekit.evaluate.transcoders import replace_mlps
from featurekit.models.hooks import capture
from featurekit.pipeline.circuit_sets import parse_layers

from .helpers import D, prompt, random_clt, tiny_llama

SMALL = ["--latents", "32", "--k", "4", "--tokens", "1500", "--set", "data.context_len=16", "--set", "data.shard_tokens=1000",
         "--set", "train.batch_size=128", "--set", "train.buffer_tokens=512", "--set", "train.lr=1e-2", "--set",
         "model.dtype=float32", "--quiet"]


def train_set(tiny, out, *extra):
    return cli.main(["circuits", "train-set", str(out), "--model", str(tiny / "model"), "--set",
                     f"data.source={tiny / 'text.txt'}", *SMALL, *extra])


def score(tiny, folder, out):
    assert cli.main(["circuits", "quality", str(folder), "--text", str(tiny / "text.txt"), "--tokens", "600",
                     "--context-len", "16", "--out", str(out), "--quiet"]) == 0
    return read_json(out)


def test_plt_set_layer_by_layer_then_resumed_and_scored(tiny, tmp_path, capsys):
    out = tmp_path / "plt"
    assert train_set(tiny, out, "--layers", "0,2") == 0
    tset = transcoder_set.load(out)
    assert tset.layers == [0, 2] and tset.model == str(tiny / "model")
    kept = sorted(p.name for p in out.iterdir() if p.name != rundir.LOCK)
    assert kept == ["layer_0", "layer_2", "transcoder_set.json"]  # the scratch runs (caches, checkpoints) are deleted
    # a kill after layer 0: its folder stays, the manifest is not there yet; the rerun trains only layer 2
    (out / transcoder_set.MANIFEST).unlink()
    shutil.rmtree(out / "layer_2")
    before = (out / "layer_0" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert train_set(tiny, out, "--layers", "0,2") == 0
    said = capsys.readouterr().out
    assert "layer 0: " in said and "skipped" in said and "layer 2: training" in said
    assert (out / "layer_0" / "model.safetensors").stat().st_mtime_ns == before
    assert transcoder_set.load(out).layers == [0, 2]
    # another config on the same folder is refused, not mixed in
    assert train_set(tiny, out, "--layers", "0", "--set", "train.lr=5e-3") == 2
    assert "trained with another config" in capsys.readouterr().err

    result = score(tiny, out, tmp_path / "q.json")
    assert result["kind"] == "transcoder_set" and result["layers"] == [0, 2] and result["total_latents"] == 64
    assert result["kl_clean_spliced"] > 0 and result["splice_tokens"] > 100
    assert set(result["fvu_per_layer_clean_inputs"]) == {"0", "2"} and all(0 < v < 1 for v in result["fvu_per_layer_clean_inputs"].values())
    assert result["loss_recovered"] == pytest.approx((result["ce_zero_ablated"] - result["ce_spliced"])
                                                     / (result["ce_zero_ablated"] - result["ce_clean"]))


@pytest.mark.parametrize("buffer", ["512", "4096"], ids=["reharvested", "one-buffer"])
def test_clt_trains_jointly_and_beats_its_untrained_self(tiny, tmp_path, buffer):
    """Each epoch harvested again (buffer < training tokens) or the one buffer reshuffled (buffer >= them)."""
    out = tmp_path / "clt"
    clt_args = ("--method", "clt", "--set", "train.epochs=3", "--set", f"train.buffer_tokens={buffer}")
    assert train_set(tiny, out, *clt_args) == 0
    cset = transcoder_set.load(out)
    assert cset.kind == "cross_layer_transcoder" and cset.layers == [0, 1, 2] and cset.clt.per_layer == 32
    cset.clt.check_causal()
    meta = read_json(out / "clt" / "featurekit.json")
    assert len(meta["normalization"]["input_scales"]) == 3 and meta["provenance"]["steps"] > 5
    trained = score(tiny, out, tmp_path / "q.json")
    assert trained["kind"] == "cross_layer_transcoder" and trained["total_latents"] == 96
    # the same CLT before training (decoders zero: every MLP writes only its mean output) recovers less
    untrained = transcoder_set.CrossLayerSet(CrossLayerTranscoder(3 * D, 96, k=4, n_layers=3, seed=0), [0, 1, 2])
    with torch.no_grad():
        untrained.clt.b_dec.copy_(cset.clt.b_dec)
    transcoder_set.save(untrained, tmp_path / "untrained", str(tiny / "model"))
    baseline = score(tiny, tmp_path / "untrained", tmp_path / "q0.json")
    assert trained["kl_clean_spliced"] < baseline["kl_clean_spliced"]
    assert trained["ce_clean"] == pytest.approx(baseline["ce_clean"])
    # a rerun of the same config skips the training
    stamp = (out / "clt" / "model.safetensors").stat().st_mtime_ns
    assert train_set(tiny, out, *clt_args) == 0
    assert (out / "clt" / "model.safetensors").stat().st_mtime_ns == stamp


def test_clt_splice_is_the_replacement_model():
    """Spliced into the model, a CLT's write at each layer is the sum of every earlier layer's decoders applied to codes
    of the SAME forward's MLP inputs; a CLT with only its diagonal blocks splices exactly like per-layer transcoders."""
    model, cset, ids = tiny_llama(), random_clt(), prompt()
    sites = [f"{kind}.{layer}" for layer in range(3) for kind in ("mlp_in", "mlp_out")]
    with torch.no_grad(), quality.splice_clt(model, cset.folded()), capture(model, *sites) as seen:
        spliced = model(input_ids=ids[None]).logits[0]
    codes = {layer: cset.encode(layer, seen[f"mlp_in.{layer}"][0]) for layer in range(3)}
    for layer in range(3):
        assert torch.allclose(seen[f"mlp_out.{layer}"][0], cset.prediction(layer, codes, seen[f"mlp_in.{layer}"][0]), atol=1e-6)
    assert cset.prediction(2, codes, None).abs().max() > 2 * cset.clt.decoder(2, 2).abs().max()  # earlier layers write too
    with torch.no_grad():
        clean = model(input_ids=ids[None]).logits[0]
    assert not torch.allclose(spliced, clean, atol=1e-3)

    diagonal = copy.deepcopy(cset.clt)
    with torch.no_grad():
        diagonal.W_dec.mul_(torch.block_diag(*[torch.ones(64, D)] * 3) > 0)
    plts = {}
    for layer in range(3):
        tc = Transcoder(D, 64, k=6, d_out=D)
        with torch.no_grad():
            rows = slice(64 * layer, 64 * (layer + 1))
            tc.W_enc.copy_(diagonal.W_enc[rows]), tc.b_enc.copy_(diagonal.b_enc[rows])
            tc.W_dec.copy_(diagonal.decoder(layer, layer)), tc.b_dec.copy_(diagonal.b_dec[D * layer:D * (layer + 1)])
        plts[layer] = tc
    with torch.no_grad(), quality.splice_clt(model, transcoder_set.CrossLayerSet(diagonal, [0, 1, 2])):
        by_clt = model(input_ids=ids[None]).logits[0]
    with torch.no_grad(), replace_mlps(model, plts):
        by_plt = model(input_ids=ids[None]).logits[0]
    assert torch.allclose(by_clt, by_plt, atol=1e-5)


def test_clt_set_files_and_refusals(tmp_path):
    cset = random_clt(model="tiny")
    transcoder_set.save(cset, tmp_path / "set")
    manifest = read_json(tmp_path / "set" / transcoder_set.MANIFEST)
    assert manifest["kind"] == "cross_layer_transcoder" and manifest["format_version"] == 2 and manifest["layers"] == [0, 1, 2]
    back = transcoder_set.load(tmp_path / "set")
    x = torch.randn(5, D)
    assert back.model == "tiny" and torch.equal(back.encode(1, x), cset.encode(1, x))
    assert back.targets(1) == [1, 2] and back.decoder_rows(0, 2, torch.tensor([3])).shape == (1, D)
    with pytest.raises(FeaturekitError, match="earlier layer"):
        back.decoder_rows(2, 0, torch.tensor([3]))
    bad = random_clt().clt
    with torch.no_grad():
        bad.W_dec[-1, 0] = 1.0  # the last layer's latent writing into layer 0
    with pytest.raises(FeaturekitError, match="below the diagonal"):
        transcoder_set.CrossLayerSet(bad, [0, 1, 2])
    with pytest.raises(FeaturekitError, match="spans 3 layers"):
        transcoder_set.CrossLayerSet(random_clt().clt, [0, 1])
    with pytest.raises(FeaturekitError, match="every layer"):
        replacement.build(tiny_llama(layers=4), cset, prompt())
    manifest["format_version"] = 3
    (tmp_path / "set" / transcoder_set.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(FeaturekitError, match="upgrade featurekit"):
        transcoder_set.load(tmp_path / "set")


def test_layer_lists_and_bad_methods():
    assert parse_layers("all", 4) == [0, 1, 2, 3] and parse_layers("0,2-3", 4) == [0, 2, 3] and parse_layers([3, 1], 4) == [1, 3]
    with pytest.raises(FeaturekitError, match=r"\[7\] are not layers of this model \(0..3\)"):
        parse_layers("1,7", 4)
    with pytest.raises(FeaturekitError, match="give 'all'"):
        parse_layers("first", 4)
    assert cli.main(["circuits", "train-set", "/nonexistent/x", "--method", "topk"]) == 2


def test_featurekit_trace_on_a_clt_set(tiny, tmp_path, capsys):
    transcoder_set.save(random_clt(model=str(tiny / "model")), tmp_path / "clt")
    assert cli.main(["trace", "--set", str(tmp_path / "clt"), "--prompt", "the cat sat on the mat", "--out",
                     str(tmp_path / "g.json")]) == 0, capsys.readouterr().err
    meta = read_json(tmp_path / "g.json")["metadata"]
    assert "cross-layer transcoder over 3 layers" in meta["info"]["description"]
    assert meta["featurekit"]["replacement_logit_error"] <= 1e-4 and meta["transcoder_list"] == [str(tmp_path / "clt" / "clt")]


def test_layer_fvu_is_one_for_a_set_that_predicts_the_mean_output():
    """A hand-checkable pair: on the tiny Llama, a CLT whose decoders are zero predicts each MLP output by its bias: with
    the bias at the mean output the FVU is 1 (on the tokens the mean was taken from)."""
    model, ids = tiny_llama(), torch.randint(1, 64, (4, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids, dtype=torch.bool)
    cset = random_clt()
    with torch.no_grad(), capture(model, *[f"mlp_out.{layer}" for layer in range(3)]) as seen:
        model(input_ids=ids)
        cset.clt.W_dec.zero_()
        cset.clt.b_dec.copy_(torch.cat([seen[f"mlp_out.{layer}"].reshape(-1, D).mean(0) for layer in range(3)]))
    fvu = quality.layer_fvu(model, cset, ids, mask, batch_contexts=3)
    assert fvu == pytest.approx({"0": 1.0, "1": 1.0, "2": 1.0}, abs=1e-4)


@pytest.mark.slow
def test_a_killed_clt_training_continues_from_its_checkpoint_to_the_same_weights(tiny, tmp_path):
    """SIGKILL at the first checkpoint (a real process), then the same command: the CLT equals an uninterrupted one."""
    args = ["circuits", "train-set", "--model", str(tiny / "model"), "--set", f"data.source={tiny / 'text.txt'}", *SMALL,
            "--method", "clt", "--set", "train.epochs=3", "--set", "train.checkpoint_every=2"]
    assert cli.main([*args[:2], str(tmp_path / "whole"), *args[2:]]) == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "featurekit.cli", *args[:2], str(killed), *args[2:]],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while not (killed / ".clt_checkpoint" / "state.json").exists() and proc.poll() is None:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert not (killed / transcoder_set.MANIFEST).exists()  # it was stopped mid-way
    assert cli.main([*args[:2], str(killed), *args[2:]]) == 0
    assert not (killed / ".clt_checkpoint").exists()
    whole, resumed = transcoder_set.load(tmp_path / "whole").clt, transcoder_set.load(killed).clt
    for name, tensor in whole.state_dict().items():
        assert torch.equal(tensor, resumed.state_dict()[name]), name


def test_featurekit_run_refuses_a_clt_and_names_the_command():
    from featurekit import pipeline
    from featurekit.config import load_config

    with pytest.raises(FeaturekitError, match="featurekit circuits train-set --method clt"):
        pipeline.resolve(load_config(None, ["dictionary.method=clt", "site=mlp_in.3"]))


def test_layers_per_pass_gives_the_same_transcoders_as_one_pass_per_layer(tiny, tmp_path, capsys):
    """Three layers harvested in one model pass (`--layers-per-pass 3`) train bit-identical transcoders, with a norm cut
    tight enough to drop different tokens at different layers (so each cache must keep its own rows)."""
    cut = ["--set", "data.max_norm_multiple=1.3"]
    assert train_set(tiny, tmp_path / "one", "--layers", "0-2", *cut) == 0
    assert train_set(tiny, tmp_path / "together", "--layers", "0-2", "--layers-per-pass", "3", *cut) == 0
    for layer in range(3):
        a = load_file(tmp_path / "one" / f"layer_{layer}" / "model.safetensors")
        b = load_file(tmp_path / "together" / f"layer_{layer}" / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), layer
    kept = sorted(p.name for p in (tmp_path / "together").iterdir() if p.name != rundir.LOCK)
    assert kept == ["layer_0", "layer_1", "layer_2", "transcoder_set.json"]
    assert train_set(tiny, tmp_path / "bad", "--layers", "0", "--layers-per-pass", "0") == 2
    assert "--layers-per-pass must be at least 1" in capsys.readouterr().err


def test_one_pass_caches_equal_their_own_harvests(tiny, tmp_path):
    """`run_harvests` writes each run the cache `run_harvest` writes for it alone: same rows, tokens and positions,
    including the outlier cut, which differs between the sites."""
    from featurekit.config import load_config
    from featurekit.data.cache import ActivationCache
    from featurekit.pipeline.circuit_sets import layer_config, open_set_model
    from featurekit.pipeline.setup import start
    from featurekit.pipeline.training import run_harvest, run_harvests

    cfg = load_config(None, [f"model.name={tiny / 'model'}", f"data.source={tiny / 'text.txt'}", "dictionary.method=transcoder",
                             "data.train_tokens=1500", "data.context_len=16", "data.shard_tokens=700", "model.dtype=float32",
                             "data.max_norm_multiple=1.3", "train.batch_size=128"])
    loaded = open_set_model(cfg)
    alone = [layer_config(cfg, tmp_path / "alone", layer) for layer in (0, 2)]
    together = [layer_config(cfg, tmp_path / "together", layer) for layer in (0, 2)]
    for one in alone + together:
        start(one, overwrite=True)
    for one in alone:
        run_harvest(one, loaded, progress=False)
    run_harvests(together, loaded, progress=False)
    counts = set()
    for a, b in zip(alone, together):
        ca, cb = ActivationCache(a.run_dir / "activations"), ActivationCache(b.run_dir / "activations")
        assert ca.meta == cb.meta and ca.sites == cb.sites
        rows = 0
        for x, y in zip(ca.iter_shards(), cb.iter_shards(), strict=True):
            assert torch.equal(x.token_ids, y.token_ids) and torch.equal(x.position, y.position)
            assert all(torch.equal(x.acts[s], y.acts[s]) for s in x.acts)
            rows += x.n_tokens
        counts.add(rows)
    assert len(counts) == 2  # the layers' norm cuts kept different tokens
