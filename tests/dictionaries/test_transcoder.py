"""Transcoders and skip transcoders: sparse path vs dense formula, the trainer's target, a known
sparse map learned, the skip path's advantage on a linear part, folding and the file round trip."""

import json

import pytest
import torch

import featurekit
from featurekit.config import TrainConfig
from featurekit.dictionaries import SkipTranscoder, Transcoder, save
from featurekit.dictionaries.operators import topk
from featurekit.evaluate.metrics import fvu
from featurekit.train import Trainer
from featurekit.train.losses import auxk_loss, fvu_loss, squared_error_loss

from ..train.synthetic import true_features

D_IN, D_OUT, N_TRUE = 24, 20, 32
IN_FEATURES = true_features(N_TRUE, D_IN, seed=0)
OUT_FEATURES = true_features(N_TRUE, D_OUT, seed=1)
LINEAR = torch.randn(D_OUT, D_IN, generator=torch.Generator().manual_seed(2)) / D_IN ** 0.5


def pairs(n: int, gen: torch.Generator, linear: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """x = sparse mixture of input features (+ offset); y = the same coefficients on OTHER features
    (a sparse map from x to y). With `linear`, x also carries dense noise and y adds LINEAR·x."""
    coeff = (torch.rand(n, N_TRUE, generator=gen) < 0.05) * torch.rand(n, N_TRUE, generator=gen) * 4
    x = coeff @ IN_FEATURES + 1.0
    y = coeff @ OUT_FEATURES + 0.5
    if linear:
        x = x + 0.5 * torch.randn(n, D_IN, generator=gen)
        y = y + x @ LINEAR.T
    return x, y


def train(cls, tmp_path, linear=False, steps=300):
    tc = cls(D_IN, 32, k=3, d_out=D_OUT, seed=0)
    cfg = TrainConfig(lr=1e-2, warmup_steps=10, log_every=50, checkpoint_every=10 ** 6, dead_tokens=4096)
    trainer = Trainer(tc, cfg, tmp_path, steps)
    trainer.init_from_data(*pairs(4096, torch.Generator().manual_seed(9), linear))
    gen = torch.Generator().manual_seed(5)
    trainer.fit((pairs(256, gen, linear) for _ in range(steps)), progress=False)
    x, y = pairs(4096, torch.Generator().manual_seed(11), linear)
    with torch.no_grad():
        codes = tc.encode(x)
        found = (torch.nn.functional.normalize(tc.W_dec, dim=1) @ OUT_FEATURES.T).max(0).values > 0.9
        return fvu(y, tc.reconstruct(x)), float((codes != 0).sum(-1).float().mean()), int(found.sum())


@pytest.mark.parametrize("cls", [Transcoder, SkipTranscoder])
def test_sparse_forward_matches_the_dense_formula_values_and_gradients(cls):
    torch.manual_seed(0)
    x, y = torch.randn(200, 12) * 2, torch.randn(200, 7)
    fast, plain = cls(12, 64, k=4, d_out=7, seed=1), cls(12, 64, k=4, d_out=7, seed=1)
    for tc in (fast, plain):  # zero-initialised decoder/skip would hide the encoder's gradient
        with torch.no_grad():
            torch.manual_seed(3)
            tc.W_dec.normal_()
            tc.b_enc.normal_()
            if cls is SkipTranscoder:
                tc.W_skip.normal_()
    dead = torch.rand(64, generator=torch.Generator().manual_seed(2)) < 0.5
    out = fast(x, y)
    aux = auxk_loss(y - out.x_hat, out.top_pre, fast.W_dec, dead, 3, pre_at=out.pre_at)
    (fvu_loss(y, out.x_hat) + aux).backward()
    pre = x @ plain.W_enc.T + plain.b_enc  # no input centring
    codes = topk(pre, 4)
    y_hat = codes @ plain.W_dec + plain.b_dec + (x @ plain.W_skip.T if cls is SkipTranscoder else 0)
    (fvu_loss(y, y_hat) + auxk_loss(y - y_hat, pre, plain.W_dec, dead, 3)).backward()
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(out.x_hat, y_hat)
    names = ["W_enc", "b_enc", "W_dec", "b_dec"] + (["W_skip"] if cls is SkipTranscoder else [])
    for name in names:
        torch.testing.assert_close(getattr(fast, name).grad, getattr(plain, name).grad, rtol=1e-4, atol=1e-6, msg=name)


def test_init_from_data_sets_both_scales_the_output_bias_and_centred_preactivations(tmp_path):
    x, y = pairs(2048, torch.Generator().manual_seed(0), linear=True)
    y = y * 7.0  # another scale than x
    tc = SkipTranscoder(D_IN, 64, k=3, d_out=D_OUT, seed=0)
    assert tc.W_dec.abs().sum() == 0 and tc.W_skip.abs().sum() == 0  # zero init (sparsify, Paulo et al.)
    trainer = Trainer(tc, TrainConfig(b_dec_init="mean"), tmp_path, 10)
    trainer.init_from_data(x, y)
    assert float(tc.input_scale) == pytest.approx(D_IN ** 0.5 / x.norm(dim=1).mean().item(), rel=1e-5)
    assert float(tc.output_scale) == pytest.approx(D_OUT ** 0.5 / y.norm(dim=1).mean().item(), rel=1e-5)
    torch.testing.assert_close(tc.b_dec.data, (y * tc.output_scale).mean(0), rtol=1e-4, atol=1e-4)
    pre = (x * tc.input_scale) @ tc.W_enc.T + tc.b_enc
    assert pre.mean(0).abs().max() < 1e-4  # b_enc = −mean(x)·W_encᵀ

    # the trainer scores the prediction against y: with ŷ = b_dec = mean(y) the batch FVU is exactly 1
    row = trainer.train_step((x, y), squared_error_loss)
    assert row["fvu"] == pytest.approx(1.0, abs=1e-4)

    # without a target a transcoder autoencodes: c_out = c_in and b_dec from x
    auto = Transcoder(D_IN, 64, k=3, seed=0)
    Trainer(auto, TrainConfig(b_dec_init="mean"), tmp_path / "auto", 10).init_from_data(x)
    assert float(auto.output_scale) == float(auto.input_scale)
    torch.testing.assert_close(auto.b_dec.data, (x * auto.input_scale).mean(0), rtol=1e-4, atol=1e-4)


def test_transcoder_learns_a_sparse_map(tmp_path):
    """y = the input's sparse coefficients written on other directions: 32 latents, k = 3.
    Measured: FVU(y) ≈ 0.11, L0 ≈ 2.1, 28 of 32 output directions found (cos > 0.9)."""
    value, l0, found = train(Transcoder, tmp_path)
    assert value < 0.16 and l0 <= 3 and found >= 24


def test_skip_transcoder_beats_the_plain_one_when_y_has_a_linear_part(tmp_path):
    """y = sparse map + LINEAR·x with dense noise in x: the linear part is out of reach of 3 latents
    per token, but W_skip fits it (measured FVU(y): plain ≈ 0.31, skip ≈ 0.13 with 24 of 32 directions found)."""
    plain, _, _ = train(Transcoder, tmp_path / "plain", linear=True)
    skip, _, found = train(SkipTranscoder, tmp_path / "skip", linear=True)
    assert skip < 0.2 and skip < 0.6 * plain
    assert found >= 18  # the sparse part is still carried by the latents


@pytest.mark.parametrize("cls", [Transcoder, SkipTranscoder])
def test_fold_and_file_round_trip_keep_the_raw_outputs(tmp_path, cls):
    tc = cls(8, 32, k=3, d_out=5, seed=0)
    with torch.no_grad():
        tc.input_scale.fill_(0.4)
        tc.output_scale.fill_(3.0)
        for p in tc.parameters():
            p.normal_()
    x = torch.randn(64, 8) * 3
    codes, y_hat, latent_part = tc.encode(x), tc.reconstruct(x), tc.decode(tc.encode(x))
    if cls is SkipTranscoder:  # decode(codes) alone has no skip term; reconstruct adds it
        torch.testing.assert_close(y_hat - latent_part, (x * 0.4) @ tc.W_skip.T / 3.0, rtol=1e-5, atol=1e-5)
    else:
        torch.testing.assert_close(y_hat, latent_part)
    tc.fold_input_scale()
    assert float(tc.input_scale) == 1.0 and float(tc.output_scale) == 1.0
    for got, want in ((tc.encode(x), codes), (tc.reconstruct(x), y_hat), (tc.decode(codes), latent_part)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    save(tc, tmp_path / "d", {"source": {"site": "mlp_in.3", "output_site": "mlp_out.3"}})
    meta = json.loads((tmp_path / "d" / "featurekit.json").read_text())
    assert meta["method"] == cls.method and meta["d_in"] == 8 and meta["d_out"] == 5
    assert meta["normalization"] == {"input_scale": 1.0, "output_scale": 1.0, "folded": True}
    assert meta["source"]["output_site"] == "mlp_out.3" and meta["hyperparams"] == {"k": 3, "d_out": 5}
    loaded = featurekit.load(tmp_path / "d")
    assert type(loaded) is cls and loaded.W_dec.shape == (32, 5)
    torch.testing.assert_close(loaded.encode(x), codes, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.reconstruct(x), y_hat, rtol=1e-5, atol=1e-5)
