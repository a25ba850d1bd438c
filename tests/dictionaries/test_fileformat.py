"""The dictionary file: round trips, folding, and the errors bad files give."""

import inspect
import json
import re

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import featurekit
from featurekit._io import FileError
from featurekit.dictionaries import ReLUSAE, TopKSAE, fileformat, read_meta, save
from featurekit.dictionaries.fileformat import METHODS
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


def small(cls, **kw):
    if cls.transcodes:
        kw["d_out"] = 8
    if "k" in inspect.signature(cls.__init__).parameters:
        kw["k"] = 4
    return cls(8, 32, **kw)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_passes_the_checks_on_save_and_load(tmp_path, method):
    sae = small(METHODS[method])
    save(sae, tmp_path / "d")
    loaded = featurekit.load(tmp_path / "d")
    assert type(loaded) is type(sae) and loaded.state_dict().keys() == sae.state_dict().keys()


def test_format_version_missing_not_an_integer_or_newer_are_told_apart(tmp_path):
    save(TopKSAE(8, 16, k=2), tmp_path / "d")
    meta_path = tmp_path / "d" / "featurekit.json"
    good = json.loads(meta_path.read_text())
    for version, words in [(None, "has no format_version"), ("1", "format_version must be a positive integer, got '1'"),
                           (2, "format version 2, newer than this featurekit reads (1)")]:
        meta_path.write_text(json.dumps({**good, "format_version": version} if version else
                                        {k: v for k, v in good.items() if k != "format_version"}))
        with pytest.raises(FeaturekitError, match=re.escape(words)):
            featurekit.load(tmp_path / "d")


def test_unknown_hyperparameter_and_dtype_name_the_valid_ones(tmp_path):
    save(TopKSAE(8, 16, k=2), tmp_path / "d")
    meta_path = tmp_path / "d" / "featurekit.json"
    good = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**good, "hyperparams": {"k": 2, "frobnicate": 1}}))
    with pytest.raises(FeaturekitError, match=r"hyperparams \['frobnicate'\] are not parameters of method 'topk' \(valid: \['k', "):
        featurekit.load(tmp_path / "d")
    meta_path.write_text(json.dumps({**good, "dtype": "float33"}))
    with pytest.raises(FeaturekitError, match=r"dtype is 'float33', not one of \['float32'"):
        featurekit.load(tmp_path / "d")


def test_tensor_mismatch_names_each_missing_unexpected_and_misshaped_key(tmp_path):
    save(TopKSAE(8, 16, k=2), tmp_path / "d")
    weights = tmp_path / "d" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["b_dec"]
    tensors["extra"] = torch.zeros(1)
    tensors["W_enc"] = torch.zeros(16, 9)
    save_file(tensors, weights)
    with pytest.raises(FeaturekitError) as caught:
        featurekit.load(tmp_path / "d")
    message = str(caught.value)
    for words in ("missing ['b_dec']", "unexpected ['extra']", "W_enc has shape (16, 9) where featurekit.json needs (16, 8)",
                  "do not belong together"):
        assert words in message


def test_non_finite_weights_are_refused_on_save_and_load(tmp_path):
    sae = TopKSAE(8, 16, k=2)
    with torch.no_grad():
        sae.W_dec[3, 1] = float("nan")
    with pytest.raises(FeaturekitError, match=r"refusing to save a dictionary to .*\['W_dec'\] hold NaN"):
        save(sae, tmp_path / "d")
    assert not (tmp_path / "d").exists()
    save(TopKSAE(8, 16, k=2), tmp_path / "d")
    tensors = load_file(tmp_path / "d" / "model.safetensors")
    tensors["b_enc"][0] = float("-inf")
    save_file(tensors, tmp_path / "d" / "model.safetensors")
    with pytest.raises(FeaturekitError, match=r"model.safetensors: the tensors \['b_enc'\] hold NaN or infinite values"):
        featurekit.load(tmp_path / "d")


def test_infinity_is_kept_where_it_is_a_meaning(tmp_path):
    gba = small(METHODS["gba"])
    assert torch.isinf(gba.window_peak).all()  # the window's running maximum before its first batch
    save(gba, tmp_path / "gba")
    assert torch.isinf(featurekit.load(tmp_path / "gba").window_peak).all()
    with torch.no_grad():
        gba.window_peak[0] = float("nan")
    with pytest.raises(FeaturekitError, match="window_peak"):
        save(gba, tmp_path / "gba2")


def test_a_full_disk_while_saving_names_the_dictionary_and_keeps_the_old_one(tmp_path, monkeypatch):
    save(TopKSAE(8, 16, k=2, seed=1), tmp_path / "d")
    before = (tmp_path / "d" / "model.safetensors").read_bytes()

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(fileformat, "save_file", full)
    with pytest.raises(FileError, match=re.escape(f"could not write {tmp_path / 'd' / 'model.safetensors'}: No space left")):
        save(TopKSAE(8, 16, k=2, seed=2), tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no staging folder or temporary file left
    assert (tmp_path / "d" / "model.safetensors").read_bytes() == before
