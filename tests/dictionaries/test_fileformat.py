"""The dictionary file: round trips, folding, and the errors bad files give."""

import json

import pytest
import torch

import featurekit
from featurekit.dictionaries import ReLUSAE, TopKSAE, read_meta, save
from featurekit.errors import FeaturekitError


def trained_like(cls, **kw):
    torch.manual_seed(0)
    sae = cls(24, 96, seed=1, **kw)
    with torch.no_grad():  # make biases and scale non-trivial, as after training
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        sae.W_dec.mul_(torch.rand(96, 1) + 0.5) if cls is ReLUSAE else None
        sae.input_scale.fill_(0.37)
    return sae


@pytest.mark.parametrize("cls,kw", [(TopKSAE, {"k": 5}), (ReLUSAE, {"l1_coefficient": 2.0})])
def test_round_trip_runs_identically_from_the_files_alone(tmp_path, cls, kw):
    sae = trained_like(cls, **kw)
    x = torch.randn(50, 24) * 4
    expected_codes, expected_x_hat = sae.encode(x), sae.reconstruct(x)
    save(sae, tmp_path / "d", {"source": {"model": "m", "site": "resid_post.1"}})
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["featurekit.json", "model.safetensors"]
    loaded = featurekit.load(tmp_path / "d")
    assert type(loaded) is cls and loaded.inference_rule() == sae.inference_rule()
    torch.testing.assert_close(loaded.encode(x), expected_codes)
    torch.testing.assert_close(loaded.reconstruct(x), expected_x_hat)
    meta = read_meta(tmp_path / "d")
    assert meta["source"]["site"] == "resid_post.1" and meta["normalization"]["input_scale"] == pytest.approx(0.37)


@pytest.mark.parametrize("cls,kw", [(TopKSAE, {"k": 5}), (ReLUSAE, {})])
def test_folding_the_input_scale_changes_no_output(cls, kw):
    sae = trained_like(cls, **kw)
    x = torch.randn(40, 24) * 4
    before = sae.reconstruct(x), sae.encode(x)
    sae.fold_input_scale()
    assert float(sae.input_scale) == 1.0
    torch.testing.assert_close(sae.reconstruct(x), before[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.encode(x), before[1], rtol=1e-5, atol=1e-5)


def test_folding_relu_decoder_norms_keeps_reconstruction_and_unit_rows():
    sae = trained_like(ReLUSAE)
    x = torch.randn(40, 24)
    before = sae.reconstruct(x)
    sae.fold_decoder_norms()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(96))
    torch.testing.assert_close(sae.reconstruct(x), before, rtol=1e-5, atol=1e-5)


def test_dimension_mismatch_is_a_clear_error(tmp_path):
    sae = TopKSAE(24, 96, k=4)
    with pytest.raises(FeaturekitError, match="24"):
        sae.encode(torch.randn(3, 25))
    save(sae, tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "featurekit.json").read_text())
    meta["d_in"] = 32
    (tmp_path / "d" / "featurekit.json").write_text(json.dumps(meta))
    with pytest.raises(FeaturekitError, match="do not belong together"):
        featurekit.load(tmp_path / "d")


def test_newer_format_version_is_refused(tmp_path):
    save(TopKSAE(8, 16, k=2), tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "featurekit.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "d" / "featurekit.json").write_text(json.dumps(meta))
    with pytest.raises(FeaturekitError, match="newer than this featurekit reads"):
        featurekit.load(tmp_path / "d")


def test_missing_or_damaged_files_are_named(tmp_path):
    with pytest.raises(FeaturekitError, match="featurekit.json is missing"):
        featurekit.load(tmp_path)
    save(TopKSAE(8, 16, k=2), tmp_path / "d")
    weights = tmp_path / "d" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(FeaturekitError, match="model.safetensors cannot be read"):
        featurekit.load(tmp_path / "d")


def test_unknown_method_lists_the_known_ones():
    from featurekit.dictionaries import build

    with pytest.raises(FeaturekitError, match="relu"):
        build("nope", 4, 8)
