"""Matryoshka SAE: nested prefixes, the grouped sparse decode, sparse-vs-dense training, that early
latents capture the frequent features on their own, and the file."""

import json

import pytest
import torch

import featurekit
from featurekit.config import TrainConfig, load_config, validate
from featurekit.dictionaries import BatchTopKSAE, MatryoshkaSAE, build_from_config, save
from featurekit.dictionaries.matryoshka import default_prefixes, grouped_decode, resolve_prefixes
from featurekit.dictionaries.operators import batch_topk
from featurekit.errors import FeaturekitError
from featurekit.evaluate.metrics import fvu, l0
from featurekit.train import Trainer
from featurekit.train.losses import auxk_loss, fvu_loss

from ..train.synthetic import true_features


def test_prefixes_default_to_the_geometric_grouping_and_end_at_f():
    assert default_prefixes(96) == [6, 12, 24, 48, 96]
    assert default_prefixes(8) == [1, 2, 4, 8]
    assert resolve_prefixes([8, 24], 96) == [8, 24, 96] and resolve_prefixes([8, 96], 96) == [8, 96]
    for bad in ([], [8, 8, 96], [24, 8], [0, 8], [8, 200]):
        with pytest.raises(FeaturekitError, match="prefixes"):
            resolve_prefixes(bad, 96)


def test_grouped_decode_equals_per_group_dense_decodes():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(40, 6, generator=g)
    idx = torch.randint(0, 40, (7, 9), generator=g)
    values = torch.rand(7, 9, generator=g)
    keep = torch.rand(7, 9, generator=g) < 0.7
    prefixes = [3, 10, 25, 40]
    dense = torch.zeros(7, 40).index_put_((torch.arange(7)[:, None].expand_as(idx)[keep], idx[keep]), values[keep], accumulate=True)
    bounds = [0, *prefixes]
    expected = torch.stack([dense[:, a:b] @ W[a:b] for a, b in zip(bounds, bounds[1:])], dim=1)
    torch.testing.assert_close(grouped_decode(idx, values, W, prefixes, keep), expected)
    torch.testing.assert_close(grouped_decode(idx, values * keep, W, prefixes), expected)  # no mask: zeros add nothing
    assert grouped_decode(idx, values, W, prefixes, torch.zeros_like(keep)).abs().sum() == 0


def plain_loss(sae, x, dead):
    """The Matryoshka loss written densely: Σ over prefixes of the FVU, plus aux-k on the full residual."""
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    codes = batch_topk(pre, sae.k)
    levels = [codes[:, :m] @ sae.W_dec[:m] + sae.b_dec for m in sae.prefixes]
    loss = sum(fvu_loss(x, x_hat) for x_hat in levels) + auxk_loss(x - levels[-1], pre, sae.W_dec, dead, 4)
    return codes, levels, loss


@pytest.mark.parametrize("skewed", [False, True])
def test_training_forward_matches_the_dense_loss_in_values_and_gradients(skewed):
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(300, 16), dim=1) * 3
    if skewed:  # one token far above the rest owns more than 4k of the batch's top entries: dense fallback
        x[0] *= 100
    fast, plain = MatryoshkaSAE(16, 256, k=5, prefixes=[16, 40, 100], seed=1), MatryoshkaSAE(16, 256, k=5, prefixes=[16, 40, 100], seed=1)
    dead = torch.rand(256, generator=torch.Generator().manual_seed(2)) < 0.5
    out = fast(x)
    assert out.pre.requires_grad is skewed  # the path we meant to test ran
    assert sorted(out.partial) == ["recon_prefix100", "recon_prefix16", "recon_prefix40"]
    prefix_losses = {name: fvu_loss(x, x_hat) for name, x_hat in out.partial.items()}  # what the trainer scores
    aux = auxk_loss(x - out.x_hat, out.top_pre, fast.W_dec, dead, 4, pre_at=out.pre_at)
    (fvu_loss(x, out.x_hat) + sum(prefix_losses.values()) + aux).backward()  # what the trainer sums
    codes, levels, loss = plain_loss(plain, x, dead)
    loss.backward()
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(out.x_hat, levels[-1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(prefix_losses["recon_prefix40"], fvu_loss(x, levels[1]))
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(fast, name).grad, getattr(plain, name).grad, rtol=1e-4, atol=1e-5, msg=name)


N_FREQUENT = 8


def two_tier_sample(features, n, gen):
    """8 frequent features (each on 25 % of tokens) and 40 rare ones (3 %), magnitudes in [1, 4), plus an offset."""
    p = torch.full((features.shape[0],), 0.03)
    p[:N_FREQUENT] = 0.25
    on = torch.rand(n, features.shape[0], generator=gen) < p
    return (on * (torch.rand(n, features.shape[0], generator=gen) * 3 + 1)) @ features + 2.0


def train(cls, features, run_dir, steps=400, **kw):
    sae = cls(24, 96, k=4, seed=1, **kw)  # seed ≠ the features' seed: W_dec does not start at the true features
    tc = TrainConfig(lr=3e-3, warmup_steps=10, log_every=50, checkpoint_every=10_000, dead_tokens=4096)
    trainer = Trainer(sae, tc, run_dir, steps)
    trainer.init_from_data(two_tier_sample(features, 4096, torch.Generator().manual_seed(9)))
    gen = torch.Generator().manual_seed(5)
    trainer.fit((two_tier_sample(features, 256, gen) for _ in range(steps)), progress=False)
    return sae


def test_first_prefix_alone_captures_the_frequent_features(tmp_path):
    # Measured (seeds 1-3, 400 steps of 256 tokens, d=24, F=96, k=4, prefixes [8, 24, 96]): the first 8
    # latents match the 8 frequent features with mean max-cos 0.79-0.85 and reconstruct alone with
    # FVU 0.45-0.47 (prefix 24: 0.20-0.22); MMCS over all 48 features 0.77-0.79, full FVU 0.14-0.16,
    # L0 3.9. BatchTopK on the same data and budget: first-8 match 0.24-0.48, first-8 FVU 0.99-1.04,
    # MMCS 0.81-0.84. Random initial decoders: MMCS 0.46-0.49.
    features = true_features(48, 24)
    sae = train(MatryoshkaSAE, features, tmp_path, prefixes=[8, 24])
    assert sae.prefixes == [8, 24, 96]
    x = two_tier_sample(features, 4096, torch.Generator().manual_seed(11))
    with torch.no_grad():
        cos = torch.nn.functional.normalize(sae.W_dec, dim=1) @ features.T
        level_fvu = [fvu(x, sae.reconstruct_prefix(x, m)) for m in sae.prefixes]
        codes = sae.encode(x)
    assert cos[:N_FREQUENT, :N_FREQUENT].max(0).values.mean() > 0.7
    assert level_fvu[0] < 0.6 and level_fvu[0] > level_fvu[1] > level_fvu[2]
    assert level_fvu[2] == pytest.approx(fvu(x, sae.decode(codes)), abs=1e-6) and level_fvu[2] < 0.25
    assert cos.max(0).values.mean() > 0.7
    assert 3.0 <= l0(codes) <= 4.5 and float(sae.theta) > 0


def test_file_records_prefixes_and_folds_the_threshold(tmp_path):
    sae = MatryoshkaSAE(8, 32, k=3, prefixes=[4, 12], seed=0)
    with torch.no_grad():
        sae.theta.fill_(0.8)
        sae.input_scale.fill_(0.25)
        sae.b_dec.normal_()
    x = torch.randn(64, 8) * 4
    expected, expected_prefix = sae.encode(x), sae.reconstruct_prefix(x, 4)
    save(sae, tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "featurekit.json").read_text())
    assert meta["hyperparams"]["prefixes"] == [4, 12, 32] and meta["inference_rule"]["prefixes"] == [4, 12, 32]
    assert meta["inference_rule"]["activation"] == "threshold" and meta["inference_rule"]["threshold"] == pytest.approx(0.8)
    loaded = featurekit.load(tmp_path / "d")
    assert type(loaded) is MatryoshkaSAE and loaded.prefixes == [4, 12, 32]
    torch.testing.assert_close(loaded.encode(x), expected)
    loaded.fold_input_scale()
    torch.testing.assert_close(loaded.encode(x), expected)
    torch.testing.assert_close(loaded.reconstruct_prefix(x, 4), expected_prefix, rtol=1e-5, atol=1e-5)


def test_built_from_the_config_with_prefixes():
    cfg = load_config(overrides=["dictionary.method=matryoshka", "dictionary.n_latents=64", "dictionary.k=5",
                                 "dictionary.prefixes=[4,16]"])
    validate(cfg)
    sae = build_from_config(cfg.dictionary, 16, seed=0)
    assert isinstance(sae, MatryoshkaSAE) and sae.prefixes == [4, 16, 64] and sae.k == 5
    assert build_from_config(load_config(overrides=["dictionary.method=matryoshka", "dictionary.n_latents=64"]).dictionary, 16).prefixes \
        == [4, 8, 16, 32, 64]
    with pytest.raises(FeaturekitError, match="prefixes"):
        build_from_config(load_config(overrides=["dictionary.method=matryoshka", "dictionary.prefixes=[16,4]"]).dictionary, 16)
    assert type(build_from_config(load_config(overrides=["dictionary.method=batchtopk"]).dictionary, 16)) is BatchTopKSAE
