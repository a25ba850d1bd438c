"""Statistical top-k (Spark) and the lazy-neuron top-k: the operators, their heavy-tail calibration,
and the TopK family's `selection` option (sparse path, training, the file)."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featurekit
from featurekit.config import DictionaryConfig, TrainConfig, load_config, validate
from featurekit.dictionaries import AbsTopKSAE, TopKSAE, build_from_config, save
from featurekit.dictionaries.kernels.sparse import mask_to_sparse
from featurekit.dictionaries.operators import (
    calibrated_multiplier,
    gaussian_multiplier,
    lazy_topk,
    statistical_threshold,
    statistical_topk,
    topk,
)
from featurekit.errors import FeaturekitError
from featurekit.evaluate.metrics import fvu, l0
from featurekit.train import Trainer
from featurekit.train.losses import auxk_loss, fvu_loss

from ..train.synthetic import sample, true_features
from .test_batchtopk import batch_and_k

ROWS = 64


def gaussian_count_tolerance(k: int, n: int, rows: int) -> float:
    """5 standard errors of the mean kept count over `rows` Gaussian rows, + 1 for the O(1) bias.

    Per row the count is ≈ Binomial(n, p = k/n) (variance k(1 − p)) at the true θ; estimating θ
    from the row's own mean and std moves it by δμ + c·δσ with var ≈ (1 + c²/2)/n, which moves the
    count by n·φ(c) per unit: variance n·φ(c)²(1 + c²/2). Their bias is c·φ(c)(1 + c²/2)/2 < 1."""
    c = gaussian_multiplier(k, n)
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    var = k * (1 - k / n) + n * phi**2 * (1 + c * c / 2)
    return 5 * math.sqrt(var / rows) + 1


def kept_count(codes: torch.Tensor) -> torch.Tensor:
    return (codes != 0).sum(-1).double()


# -- statistical top-k: count, order, calibration -------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(st.integers(256, 4096), st.floats(0.0005, 0.25), st.integers(0, 2**31 - 1), st.floats(-5, 5), st.floats(0.01, 100))
def test_statistical_topk_keeps_about_k_on_gaussian_rows(n, frac, seed, shift, scale):
    k = max(1, int(frac * n))
    pre = torch.randn(ROWS, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale + shift
    selected = pre > statistical_threshold(pre, k)  # the selection; the hard form then drops its negatives (ReLU)
    assert abs(float(kept_count(selected).mean()) - k) <= gaussian_count_tolerance(k, n, ROWS)
    assert torch.equal(statistical_topk(pre, k) != 0, selected & (pre > 0))


@settings(max_examples=150, deadline=None)
@given(batch_and_k(), st.booleans())
def test_statistical_topk_keeps_values_above_all_dropped_ones(case, signed):
    pre, k = case
    codes = statistical_topk(pre, k, signed=signed)
    kept = codes != 0
    score = pre.abs() if signed else pre
    assert torch.equal(codes[kept], pre[kept])  # values (and signs) pass unchanged
    if not signed:
        assert (codes >= 0).all()
    theta = statistical_threshold(score, k)
    assert (score[kept] > theta.expand_as(score)[kept]).all()
    for r in range(pre.shape[0]):
        if kept[r].any() and (~kept[r]).any():
            assert score[r][kept[r]].min() >= score[r][~kept[r]].max()


@settings(max_examples=100, deadline=None)
@given(batch_and_k(), st.booleans())
def test_soft_form_is_the_shrunk_hard_form(case, signed):
    pre, k = case
    score = pre.abs() if signed else pre
    theta = statistical_threshold(score, k)
    soft = statistical_topk(pre, k, soft=True, signed=signed)
    expected = (score - theta).relu() * (pre.sign() if signed else 1)
    torch.testing.assert_close(soft, expected)
    if k >= pre.shape[-1]:  # c = −inf keeps everything: hard form = ReLU (or identity when signed)
        assert torch.equal(statistical_topk(pre, k, signed=signed), pre if signed else pre.relu())


@settings(max_examples=20, deadline=None)
@given(st.sampled_from(["laplace", "student_t3", "gaussian"]), st.sampled_from([8, 16, 32, 64]), st.integers(0, 2**31 - 1))
def test_calibration_fixes_the_count_on_heavy_tailed_rows(dist, k, seed):
    n = 4096
    torch.manual_seed(seed)
    draw = {"laplace": torch.distributions.Laplace(0.0, 1.0), "student_t3": torch.distributions.StudentT(3.0),
            "gaussian": torch.distributions.Normal(0.0, 1.0)}[dist]
    calibration, held_out = draw.sample((ROWS, n)), draw.sample((ROWS, n))
    gaussian_counts = kept_count(held_out > statistical_threshold(held_out, k))
    c = calibrated_multiplier(calibration, k)
    # exact on its own batch, up to one entry: when the B·k-th and (B·k+1)-th largest z lie within float32 rounding of each
    # other, mean + c·std can land on the wrong side of one of them (hypothesis found such a draw: 4,095 of 4,096)
    assert abs(float(kept_count(calibration > statistical_threshold(calibration, k, c)).sum()) - k * ROWS) <= 1
    counts = kept_count(held_out > statistical_threshold(held_out, k, c))
    tolerance = 5 * math.sqrt(2) * float(counts.std()) / math.sqrt(ROWS) + 1  # calibration batch and held-out batch
    assert abs(float(counts.mean()) - k) <= tolerance
    if dist == "gaussian":
        assert abs(c - gaussian_multiplier(k, n)) < 0.25
    elif k <= 16:  # far in the tail (k/n ≤ 1/256) the Gaussian quantile keeps 2.5–3× too many (§13's table)
        assert float(gaussian_counts.mean()) > 2 * k and c > gaussian_multiplier(k, n) + 0.5


def test_multiplier_edge_cases():
    assert gaussian_multiplier(64, 64) == float("-inf") and abs(gaussian_multiplier(16, 32)) < 1e-12
    assert calibrated_multiplier(torch.randn(4, 8), 8) == float("-inf")
    flat = torch.ones(3, 10)  # std = 0: nothing is above the mean, and c = −inf still keeps all
    assert not statistical_topk(flat, 2).any() and torch.equal(statistical_topk(flat, 10), flat)
    with pytest.raises(ValueError):
        statistical_topk(flat, 0)
    bf16 = torch.randn(2, 512).bfloat16()
    assert statistical_topk(bf16, 16).dtype == torch.bfloat16


# -- lazy-neuron top-k ----------------------------------------------------------------------------
@settings(max_examples=150, deadline=None)
@given(batch_and_k())
def test_lazy_topk_keeps_exactly_k_values_and_equals_relu_topk_after_relu(case):
    pre, k = case
    kk = min(k, pre.shape[-1])
    codes = lazy_topk(pre, k)  # a signed activation map (no zeros): exactly k entries survive
    kept = codes != 0
    assert torch.equal(kept.sum(-1), torch.full((pre.shape[0],), kk))
    assert torch.equal(codes[kept], pre[kept])
    for r in range(pre.shape[0]):
        if (~kept[r]).any():
            assert pre[r][kept[r]].min() >= pre[r][~kept[r]].max()
    assert torch.equal(lazy_topk(pre.relu(), k), topk(pre, k))  # TopK after ReLU = ReLU after TopK (Gao et al.)


# -- the sparse path -------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 30), st.floats(0.0, 1.0), st.integers(0, 2**31 - 1))
def test_mask_to_sparse_lists_each_rows_columns(rows, width, p, seed):
    mask = torch.rand(rows, width, generator=torch.Generator().manual_seed(seed)) < p
    idx, keep = mask_to_sparse(mask)
    assert idx.shape == keep.shape and idx.shape[1] == max(int(mask.sum(-1).max()), 1)
    for r in range(rows):
        assert idx[r][keep[r]].tolist() == mask[r].nonzero().flatten().tolist()
        assert not keep[r][int(mask[r].sum()):].any()


@pytest.mark.parametrize("cls", [TopKSAE, AbsTopKSAE])
def test_statistical_sparse_path_matches_dense_values_and_gradients(cls):
    torch.manual_seed(0)
    x = torch.randn(200, 12) * 2
    fast, plain = cls(12, 64, k=4, selection="statistical", seed=1), cls(12, 64, k=4, selection="statistical", seed=1)
    dead = torch.rand(64, generator=torch.Generator().manual_seed(2)) < 0.5
    out = fast(x)
    aux = auxk_loss(x - out.x_hat, out.top_pre, fast.W_dec, dead, 3, pre_at=out.pre_at, signed=cls.signed)
    (fvu_loss(x, out.x_hat) + aux).backward()
    pre = (x - plain.b_dec) @ plain.W_enc.T + plain.b_enc
    codes = statistical_topk(pre, 4, plain.multiplier, signed=cls.signed)  # the mask carries no gradient
    x_hat = codes @ plain.W_dec + plain.b_dec
    (fvu_loss(x, x_hat) + auxk_loss(x - x_hat, pre, plain.W_dec, dead, 3, signed=cls.signed)).backward()
    counts = (out.codes != 0).sum(-1)
    assert counts.min() < counts.max()  # a varying count per token went through the padded kernels
    torch.testing.assert_close(out.codes, codes.detach())
    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-5, atol=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(fast, name).grad, getattr(plain, name).grad, rtol=1e-4, atol=1e-6, msg=name)


# -- training on synthetic ground truth -----------------------------------------------------------
def train_statistical(tmp_path, selection, steps=500):
    features = true_features(48, 24)
    sae = TopKSAE(24, 96, k=4, selection=selection, seed=0)
    trainer = Trainer(sae, TrainConfig(lr=3e-3, warmup_steps=10, log_every=50, checkpoint_every=1000, dead_tokens=4096), tmp_path, steps)
    trainer.init_from_data(sample(features, 4096, torch.Generator().manual_seed(9)))
    gen = torch.Generator().manual_seed(5)
    trainer.fit((sample(features, 256, gen) for _ in range(steps)), progress=False)
    x = sample(features, 4096, torch.Generator().manual_seed(11))
    with torch.no_grad():
        codes = sae.encode(x)  # the per-token statistical rule
        cos = torch.nn.functional.normalize(sae.W_dec, dim=1) @ features.T
        best = cos.max(0).values
    return sae, {"fvu": fvu(x, sae.decode(codes)), "l0": l0(codes), "mmcs": float(best.mean()),
                 "recovered": float((best > 0.9).double().mean()), "dead": float(((codes != 0).sum(0) == 0).double().mean())}


def test_statistical_selection_trains_and_recovers_features(tmp_path):
    sae, m = train_statistical(tmp_path, "statistical")
    assert int(sae.multiplier_updates) == 500 and float(sae.multiplier) != gaussian_multiplier(4, 96)
    assert m["fvu"] < 0.2 and m["mmcs"] > 0.9 and m["recovered"] > 0.7  # measured: 0.076, 0.98, 0.94
    assert 2.8 <= m["l0"] <= 5.5  # calibrated: ≈ k = 4 per token at inference (measured 3.9; the EMA of c lags)


# -- the option and the file ------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [TopKSAE, AbsTopKSAE])
def test_statistical_file_records_the_rule_and_folds(tmp_path, cls):
    sae = cls(8, 32, k=3, selection="statistical", seed=0)
    with torch.no_grad():
        sae.multiplier.fill_(1.3)
        sae.input_scale.fill_(0.4)
        sae.b_dec.normal_()
    x = torch.randn(64, 8) * 3
    expected = sae.encode(x)
    assert (expected != 0).any() and ((expected != 0).sum(-1) != 3).any()
    sae.fold_input_scale()  # the rule is scale-free: c needs no folding
    torch.testing.assert_close(sae.encode(x), expected, rtol=1e-5, atol=1e-5)
    save(sae, tmp_path / "d")
    rule = json.loads((tmp_path / "d" / "featurekit.json").read_text())["inference_rule"]
    assert rule["activation"] == "statistical_topk" and abs(rule["multiplier"] - 1.3) < 1e-6 and rule["signed"] is cls.signed
    loaded = featurekit.load(tmp_path / "d")
    assert loaded.selection == "statistical"
    torch.testing.assert_close(loaded.encode(x), expected, rtol=1e-5, atol=1e-5)


def test_exact_selection_files_are_unchanged_and_config_checks_the_option():
    assert TopKSAE(8, 32, k=3).hyperparams() == {"k": 3} and "multiplier" not in TopKSAE(8, 32, k=3).state_dict()
    sae = build_from_config(DictionaryConfig.of("topk", 32, k=3, selection="statistical_gaussian"), d_in=8)
    assert sae.selection == "statistical_gaussian" and abs(float(sae.multiplier) - gaussian_multiplier(3, 32)) < 1e-6
    out = sae(torch.randn(16, 8))
    sae.after_step(out)  # the paper's fixed Gaussian c is never recalibrated
    assert abs(float(sae.multiplier) - gaussian_multiplier(3, 32)) < 1e-6
    validate(load_config(None, ["dictionary.selection=statistical"]))
    for bad in (["dictionary.selection=sorted"], ["dictionary.selection=statistical", "dictionary.method=batchtopk"]):
        with pytest.raises(FeaturekitError, match="selection"):
            validate(load_config(None, bad))
    with pytest.raises(FeaturekitError, match="selection"):
        TopKSAE(8, 32, k=3, selection="lazy")
