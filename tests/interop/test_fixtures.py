"""featurekit reads files the real libraries wrote (tests/fixtures/interop, made by make_fixtures.py with SAELens,
sparsify and dictionary_learning in their own venvs) and its encode/decode equal the library's own outputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import featurekit
from featurekit.dictionaries import Dictionary

FIXTURES = Path(__file__).parents[1] / "fixtures" / "interop"
#: fixture folder → (featurekit method, site) it must map onto
SAELENS = {
    "standard": ("relu", "resid_post.6"), "standard_uncentred": ("relu", "mlp_out.3"),
    "standard_trained": ("relu", "resid_pre.6"), "jumprelu": ("jumprelu", "resid_post.6"),
    "jumprelu_uncentred": ("jumprelu", "attn_z.2"), "topk": ("topk", "resid_post.6"),
    "topk_no_rescale": ("topk", "mlp_in.6"), "abstopk": ("abstopk", "resid_post.6"),
    "batchtopk": ("batchtopk", "resid_post.6"), "matryoshka": ("matryoshka", "resid_post.6"),
}
SPARSIFY = {
    "sae/layers.6": ("topk", "resid_post.6", None), "sae_multi_topk/layers.4.mlp": ("topk", "mlp_out.4", None),
    "transcoder/layers.6.mlp": ("transcoder", "mlp_in.6", "mlp_out.6"),
    "skip_transcoder/layers.6.mlp": ("skiptranscoder", "mlp_in.6", "mlp_out.6"),
}


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """≤ 1e-5 relative to the tensor's scale (elementwise relative error is undefined at the zeros of sparse codes)."""
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-12))
    assert err <= 1e-5, f"max error {err:.2e} relative to the largest value"


@torch.no_grad()
def check(dictionary: Dictionary, folder: Path) -> None:
    want = load_file(folder / "expected.safetensors")
    codes = dictionary.encode(want["x"])
    assert torch.equal(codes != 0, want["codes"] != 0), "a different set of latents fired"
    close(codes, want["codes"])
    close(dictionary.reconstruct_from(want["x"], codes), want["x_hat"])


@pytest.mark.parametrize("name", sorted(SAELENS))
def test_saelens_files_encode_and_decode_as_saelens(name):
    folder = FIXTURES / "saelens" / name
    sae = featurekit.load(folder)
    method, site = SAELENS[name]
    assert (sae.method, sae.metadata["source"]["site"], sae.metadata["source"]["model"]) == (method, site, "gpt2")
    assert sae.metadata["provenance"]["imported_from"]["format"] == "saelens"
    check(sae, folder)


@pytest.mark.parametrize("name", sorted(SPARSIFY))
def test_sparsify_files_encode_and_decode_as_sparsify(name):
    folder = FIXTURES / "sparsify" / name
    coder = featurekit.load(folder, model="EleutherAI/pythia-70m")
    method, site, output_site = SPARSIFY[name]
    src = coder.metadata["source"]
    assert (coder.method, src["site"], src.get("output_site"), src["model"]) == (method, site, output_site, "EleutherAI/pythia-70m")
    check(coder, folder)


def test_a_loaded_foreign_dictionary_saves_as_featurekit_and_reloads_identically(tmp_path):
    folder = FIXTURES / "saelens" / "jumprelu"
    sae = featurekit.load(folder)
    featurekit.save(sae, tmp_path / "dictionary", metadata={k: sae.metadata[k] for k in ("source", "provenance")})
    again = featurekit.load(tmp_path / "dictionary")
    assert again.metadata["provenance"]["imported_from"]["architecture"] == "jumprelu"
    x = load_file(folder / "expected.safetensors")["x"]
    assert torch.equal(again.encode(x), sae.encode(x))


DICTIONARY_LEARNING = {"autoencoder": "relu", "autoencoder_new": "relu", "topk": "topk", "batchtopk": "batchtopk",
                       "matryoshka": "matryoshka", "jumprelu": "jumprelu"}


@pytest.mark.parametrize("name", sorted(DICTIONARY_LEARNING))
def test_dictionary_learning_files_encode_and_decode_as_dictionary_learning(name):
    folder = FIXTURES / "dictionary_learning" / name / "trainer_0"
    ae = featurekit.load(folder)
    src = ae.metadata["source"]
    assert (ae.method, src["site"], src["model"]) == (DICTIONARY_LEARNING[name], "resid_post.3", "EleutherAI/pythia-70m-deduped")
    check(ae, folder)


@pytest.mark.parametrize("folder", ["saelens/batchtopk", "sparsify/skip_transcoder/layers.6.mlp",
                                    "dictionary_learning/matryoshka/trainer_0"])
def test_the_evaluation_code_accepts_a_loaded_foreign_dictionary(folder):
    """featurekit's reconstruction evaluation (what `featurekit eval` runs) on a foreign file: its FVU and L0 are
    those of the library's own outputs."""
    from featurekit.evaluate.splice import reconstruction_eval

    d = featurekit.load(FIXTURES / folder)
    want = load_file(FIXTURES / folder / "expected.safetensors")
    x = want["x"]
    target = want["x_hat"] if d.transcodes else x  # a transcoder scored against the library's prediction: FVU 0
    result = reconstruction_eval(d, [(x[:16], target[:16]), (x[16:], target[16:])] if d.transcodes else [x[:16], x[16:]])
    fvu = float(((x - want["x_hat"]) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert result["l0"] == pytest.approx(float((want["codes"] != 0).sum(-1).float().mean()))
    assert result["fvu"] == pytest.approx(0.0 if d.transcodes else fvu, abs=1e-5)


def test_a_pre_v6_saelens_topk_config_loads_as_topk(tmp_path):
    """SAELens before v6 saved TopK SAEs as architecture "standard" with activation_fn_str "topk", and kept the
    model and hook at the top level: the same weights give the same outputs as the v6 file."""
    import json
    import shutil

    folder = tmp_path / "old_topk"
    shutil.copytree(FIXTURES / "saelens" / "topk_no_rescale", folder)
    new = json.loads((folder / "cfg.json").read_text())
    old = {"architecture": "standard", "d_in": new["d_in"], "d_sae": new["d_sae"], "dtype": "float32", "device": "cpu",
           "activation_fn_str": "topk", "activation_fn_kwargs": {"k": new["k"]}, "apply_b_dec_to_input": True,
           "finetuning_scaling_factor": False, "normalize_activations": "none", "model_name": "gpt2",
           "hook_name": new["metadata"]["hook_name"], "hook_layer": 6}
    (folder / "cfg.json").write_text(json.dumps(old))
    sae = featurekit.load(folder)
    assert (sae.method, sae.k, sae.metadata["source"]["site"]) == ("topk", new["k"], "mlp_in.6")
    check(sae, folder)
