"""Feature Choice and Mutual Choice SAEs: the operators, their per-token threshold forms, the sparse
training path, ground-truth recovery against TopK, aux_zipf_loss, and the file."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featurekit
from featurekit.config import DictionaryConfig, TrainConfig, load_config, validate
from featurekit.dictionaries import FeatureChoiceSAE, MutualChoiceSAE, TopKSAE, build_from_config, save
from featurekit.dictionaries.operators import batch_topk, feature_choice, mutual_choice, threshold
from featurekit.errors import FeaturekitError
from featurekit.evaluate.metrics import fvu, l0
from featurekit.train import Trainer
from featurekit.train.losses import aux_zipf_loss, auxk_loss, fvu_loss, zipf_expected_density

from ..train.synthetic import sample, true_features


@st.composite
def batch_and_m(draw, positive=False):
    rows, width = draw(st.integers(1, 12)), draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    pre = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * draw(st.floats(0.1, 50))
    if positive:
        pre = pre.abs() + 1e-3
    m = draw(st.one_of(st.integers(1, rows + 2).map(float), st.floats(0.05, rows + 2.0)))
    return pre, m


@settings(max_examples=200, deadline=None)
@given(batch_and_m())
def test_feature_choice_keeps_each_latents_largest_tokens(case):
    pre, m = case
    codes = feature_choice(pre, m)
    kept = codes != 0
    assert torch.equal(codes[kept], pre[kept]) and (codes >= 0).all()
    rows = pre.shape[0]
    counts = kept.sum(0)
    assert (counts <= min(math.ceil(m), rows)).all()
    assert (counts >= torch.clamp((pre > 0).sum(0), max=min(math.floor(m), rows))).all()
    for j in range(pre.shape[1]):  # a column keeps its largest positive entries
        dropped = (~kept[:, j]) & (pre[:, j] > 0)
        if kept[:, j].any() and dropped.any():
            assert pre[kept[:, j], j].min() >= pre[dropped, j].max()


@settings(max_examples=200, deadline=None)
@given(batch_and_m(positive=True))
def test_feature_choice_spends_the_budget_exactly(case):
    pre, m = case
    rows, width = pre.shape
    kept = feature_choice(pre, m) != 0
    total = min(round(m * width), rows * width)
    assert int(kept.sum()) == total
    counts = kept.sum(0)
    base = total // width
    assert set(counts.tolist()) <= {base, min(base + 1, rows)}
    if base < rows and 0 < total - base * width:  # the extra slots go to the strongest next candidates
        nxt = pre.sort(dim=0, descending=True).values[base]
        assert nxt[counts > base].min() >= nxt[counts == base].max()


def test_feature_choice_capacity_k_b_over_f_gives_mean_l0_k():
    pre = torch.rand(256, 64, generator=torch.Generator().manual_seed(0)) + 0.01
    codes = feature_choice(pre, 5 * 256 / 64)
    assert torch.equal((codes != 0).sum(0), torch.full((64,), 20))
    assert l0(codes) == 5.0
    assert (codes != 0).sum(-1).float().std() > 0  # tokens get different numbers of latents


@settings(max_examples=200, deadline=None)
@given(batch_and_m())
def test_per_latent_thresholds_just_below_each_smallest_kept_value_reproduce_feature_choice(case):
    pre, m = case
    codes = feature_choice(pre, m)
    kept = codes > 0
    smallest = codes.masked_fill(~kept, float("inf")).min(0).values
    theta = torch.where(kept.any(0), torch.nextafter(smallest, torch.tensor(float("-inf"))), pre.max(0).values)
    assert torch.equal(threshold(pre, theta), codes)


@settings(max_examples=150, deadline=None)
@given(batch_and_m())
def test_mutual_choice_is_batch_topk_and_spends_b_times_k(case):
    pre, m = case
    k = max(1, int(m))
    codes = mutual_choice(pre, k)
    assert torch.equal(codes, batch_topk(pre, k))
    assert int((codes != 0).sum()) == min(k * pre.shape[0], int((pre > 0).sum()))
    if (codes > 0).any():
        theta = torch.nextafter(codes[codes > 0].min(), torch.tensor(float("-inf")))
        assert torch.equal(threshold(pre, theta), codes)


def dense_reference(sae, x, m):
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    codes = feature_choice(pre, m)
    return pre, codes, codes @ sae.W_dec + sae.b_dec


def check_paths_agree(rows, d, width, k, sparse):
    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(rows, d), dim=1) * 3
    fast, plain = FeatureChoiceSAE(d, width, k=k, seed=1), FeatureChoiceSAE(d, width, k=k, seed=1)
    if not sparse:  # one token aligned with most encoder rows: it is every latent's first choice
        x[0] = fast.W_enc.detach().sum(0) * 3
    dead = torch.rand(width, generator=torch.Generator().manual_seed(2)) < 0.5
    out = fast(x)
    assert out.pre.requires_grad is not sparse  # the path we meant to test ran
    aux = auxk_loss(x - out.x_hat, out.top_pre, fast.W_dec, dead, 3, pre_at=out.pre_at)
    (fvu_loss(x, out.x_hat) + aux).backward()
    pre, codes, x_hat = dense_reference(plain, x, k * rows / width)
    (fvu_loss(x, x_hat) + auxk_loss(x - x_hat, pre, plain.W_dec, dead, 3)).backward()
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-5, atol=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(fast, name).grad, getattr(plain, name).grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sparse_training_path_matches_dense_values_and_gradients():
    check_paths_agree(rows=300, d=16, width=256, k=5, sparse=True)


def test_dense_fallback_matches_the_reference_too():
    check_paths_agree(rows=6, d=8, width=8, k=3, sparse=False)  # one token gets more than F/2 latents


def test_thresholds_track_each_latents_smallest_kept_value():
    sae = FeatureChoiceSAE(8, 16, k=2, threshold_decay=0.9, seed=0)
    x = torch.randn(32, 8)
    first = sae(x)
    sae.after_step(first)
    kept = first.codes > 0
    smallest = first.codes.masked_fill(~kept, float("inf")).min(0).values
    assert kept.any(0).all()
    torch.testing.assert_close(sae.theta, smallest)
    second = sae(torch.randn(32, 8) * 2)
    sae.after_step(second)
    now = second.codes.masked_fill(second.codes <= 0, float("inf")).min(0).values
    torch.testing.assert_close(sae.theta, 0.9 * smallest + 0.1 * now)
    assert sae.theta_updates.eq(2).all()


def train(cls, features, run_dir, steps=400, seed=1, **cfg):
    sae = cls(24, 96, k=4, seed=seed)  # seed ≠ the features' seed: W_dec does not start at the true features
    tc = TrainConfig(lr=3e-3, warmup_steps=10, log_every=50, checkpoint_every=10_000, dead_tokens=4096, **cfg)
    trainer = Trainer(sae, tc, run_dir, steps)
    trainer.init_from_data(sample(features, 4096, torch.Generator().manual_seed(9)))
    gen = torch.Generator().manual_seed(5)
    trainer.fit((sample(features, 256, gen) for _ in range(steps)), progress=False)
    x = sample(features, 4096, torch.Generator().manual_seed(11))
    with torch.no_grad():
        codes = sae.encode(x)  # the per-token inference rule
        best = (torch.nn.functional.normalize(sae.W_dec, dim=1) @ features.T).max(0).values
        dead = float(((codes != 0).sum(0) == 0).float().mean())
        return {"mmcs": float(best.mean()), "fvu": fvu(x, sae.decode(codes)), "l0": l0(codes), "dead": dead}, trainer


def test_feature_choice_recovers_features_with_no_dead_latents_where_topk_has_some(tmp_path):
    # Measured (seed 1, 400 steps of 256 tokens, 48 true features in d=24, F=96, k=4): FC MMCS 0.927,
    # FVU 0.142, inference L0 3.15, dead 0 %; TopK MMCS 0.973, FVU 0.097, L0 3.89, dead 11.5 %.
    features = true_features(48, 24)
    fc, _ = train(FeatureChoiceSAE, features, tmp_path / "fc")
    topk, _ = train(TopKSAE, features, tmp_path / "topk")
    assert fc["mmcs"] > 0.85 and fc["fvu"] < 0.2
    assert 2.5 <= fc["l0"] <= 4.5
    assert fc["dead"] < topk["dead"]


def test_mutual_choice_recovers_features(tmp_path):
    # Measured (seeds 1-3): MMCS 0.834-0.847, FVU 0.128-0.131, inference L0 3.60-3.67; random init MMCS 0.46-0.49.
    mc, trainer = train(MutualChoiceSAE, true_features(48, 24), tmp_path)
    assert mc["mmcs"] > 0.78 and mc["fvu"] < 0.2 and 3.0 <= mc["l0"] <= 4.5
    assert float(trainer.sae.theta) > 0


def zipf_densities(n, s=1.1, c=0.3):
    return c * torch.arange(1, n + 1, dtype=torch.float32) ** (-s)


def test_zipf_fit_is_exact_on_zipf_densities_in_any_order():
    dens = zipf_densities(64)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(zipf_expected_density(dens[perm]), dens[perm], rtol=1e-4, atol=0)
    assert torch.isinf(zipf_expected_density(torch.tensor([0.2, 0.0, 0.0]))).all()  # nothing to fit


def test_aux_zipf_is_aux_k_over_latents_far_below_their_zipf_density():
    dens = zipf_densities(40)
    low = torch.tensor([30, 33, 37])
    dens[low] *= 0.05  # underutilised tail latents
    dens[39] = 0.0  # dead
    underused = torch.zeros(40, dtype=torch.bool)
    underused[[30, 33, 37, 39]] = True
    g = torch.Generator().manual_seed(1)
    pre, W, residual = torch.randn(6, 40, generator=g), torch.randn(40, 5, generator=g), torch.randn(6, 5, generator=g)
    torch.testing.assert_close(aux_zipf_loss(residual, pre, W, dens, 3), auxk_loss(residual, pre, W, underused, 3))
    assert aux_zipf_loss(residual, pre, W, zipf_densities(40), 3) == 0  # all on the curve: nothing to revive


def test_aux_zipf_is_wired_into_the_trainer_for_any_method(tmp_path):
    features = true_features(48, 24)
    sae = MutualChoiceSAE(24, 96, k=4, seed=1)
    cfg = TrainConfig(lr=3e-3, warmup_steps=5, log_every=1, checkpoint_every=10_000, aux_zipf_coef=1 / 32, aux_zipf_tau=0.5)
    trainer = Trainer(sae, cfg, tmp_path, 20)
    trainer.init_from_data(sample(features, 1024, torch.Generator().manual_seed(9)))
    gen = torch.Generator().manual_seed(5)
    trainer.fit((sample(features, 256, gen) for _ in range(20)), progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert "aux_zipf_loss" not in rows[0] and "aux_zipf_loss" in rows[1]  # no density estimate before the first step
    assert trainer.dead.density.shape == (96,) and 3.5 < float(trainer.dead.density.sum()) < 4.5  # Σ density = L0 ≈ k
    # the next step's term is the pure function on the tracked density, times the coefficient
    batch = sample(features, 256, gen)
    with torch.no_grad():
        x = batch * sae.input_scale
        out = sae(x)
        expected = cfg.aux_zipf_coef * aux_zipf_loss(x - out.x_hat, out.pre, sae.W_dec, trainer.dead.density, trainer.k_aux, tau=0.5)
    assert expected > 0
    row = trainer.train_step(batch, fvu_loss)
    assert abs(row["aux_zipf_loss"] - float(expected)) < 1e-6
    trainer.save()
    resumed = Trainer(MutualChoiceSAE(24, 96, k=4, seed=2), cfg, tmp_path, 20)
    resumed.resume()  # the density estimate is part of the checkpoint (an exact resume needs it)
    assert torch.equal(resumed.dead.density, trainer.dead.density)


def test_files_record_the_inference_rule_and_fold_the_thresholds(tmp_path):
    for cls in (FeatureChoiceSAE, MutualChoiceSAE):
        sae = cls(8, 32, k=3, seed=0)
        with torch.no_grad():
            sae.theta.copy_(torch.rand_like(sae.theta) + 0.2)
            sae.input_scale.fill_(0.25)
            sae.b_dec.normal_()
            sae.b_enc.normal_(std=0.1)
        x = torch.randn(64, 8) * 4
        expected, expected_x_hat = sae.encode(x), sae.reconstruct(x)
        assert (expected != 0).any()
        save(sae, tmp_path / cls.method)
        loaded = featurekit.load(tmp_path / cls.method)
        assert type(loaded) is cls and loaded.inference_rule() == sae.inference_rule()
        torch.testing.assert_close(loaded.encode(x), expected)
        sae.fold_input_scale()
        torch.testing.assert_close(sae.encode(x), expected)
        torch.testing.assert_close(sae.reconstruct(x), expected_x_hat, rtol=1e-5, atol=1e-5)
    meta = json.loads((tmp_path / "featurechoice" / "featurekit.json").read_text())
    assert meta["inference_rule"]["scope"] == "per_latent" and meta["inference_rule"]["training_rule"]["activation"] == "feature_choice"
    meta = json.loads((tmp_path / "mutualchoice" / "featurekit.json").read_text())
    assert meta["inference_rule"]["training_rule"]["activation"] == "mutual_choice"


def test_built_from_the_config():
    for method in ("featurechoice", "mutualchoice"):
        cfg = load_config(overrides=[f"dictionary.method={method}", "dictionary.n_latents=64", "dictionary.k=5",
                                     "dictionary.threshold_decay=0.9", "train.aux_zipf_coef=0.03"])
        validate(cfg)
        sae = build_from_config(cfg.dictionary, 16, seed=0)
        assert sae.method == method and sae.k == 5 and sae.threshold_decay == 0.9 and sae.n_latents == 64
        assert cfg.train.aux_zipf_coef == 0.03
    assert isinstance(build_from_config(DictionaryConfig.of("featurechoice", 32), 8), FeatureChoiceSAE)
    with pytest.raises(FeaturekitError, match="aux_zipf"):
        validate(load_config(overrides=["train.aux_zipf_tau=0"]))


def test_feature_choice_calibration_sets_per_latent_thresholds_to_the_mean_batch_cut():
    sae = FeatureChoiceSAE(8, 16, k=2, seed=0)
    batches = [torch.randn(64, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    result = sae.calibrate(batches)
    with torch.no_grad():
        m = int(2 * 64 / 16)  # 8 tokens per latent per batch
        cuts = torch.stack([sae.pre_activation(b).relu().topk(m, dim=0).values[-1] for b in batches])
    fired = (cuts > 0).sum(0)
    expected = cuts.sum(0) / fired.clamp_min(1)
    torch.testing.assert_close(sae.theta[fired > 0], expected[fired > 0])
    assert result["latents_set"] == int((fired > 0).sum())
