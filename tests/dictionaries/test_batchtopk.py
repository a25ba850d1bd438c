"""BatchTopK: the batch operator, its per-token threshold form, training and the file."""

import json

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import featurekit
from featurekit.config import TrainConfig
from featurekit.dictionaries import BatchTopKSAE, save
from featurekit.dictionaries.operators import batch_topk, batch_topk_sparse, threshold
from featurekit.evaluate.metrics import fvu, l0
from featurekit.train import Trainer

from ..train.synthetic import sample, true_features


@st.composite
def batch_and_k(draw):
    rows, width = draw(st.integers(1, 12)), draw(st.integers(1, 30))
    seed = draw(st.integers(0, 2**31 - 1))
    pre = torch.randn(rows, width, generator=torch.Generator().manual_seed(seed)) * draw(st.floats(0.1, 50))
    return pre, draw(st.integers(1, width + 2))


@settings(max_examples=150, deadline=None)
@given(batch_and_k())
def test_batch_topk_keeps_the_largest_b_times_k_positive_entries(case):
    pre, k = case
    codes = batch_topk(pre, k)
    positives = int((pre > 0).sum())
    assert int((codes != 0).sum()) == min(k * pre.shape[0], positives)
    kept = codes != 0
    assert torch.equal(codes[kept], pre[kept]) and (codes >= 0).all()
    dropped = (~kept) & (pre > 0)
    if kept.any() and dropped.any():
        assert codes[kept].min() >= pre[dropped].max()


@settings(max_examples=120, deadline=None)
@given(rows=st.integers(1, 16), width=st.sampled_from([16, 64, 200, 512]), k=st.integers(1, 12),
       skew=st.sampled_from([0.0, 2.0, 6.0]), levels=st.sampled_from([0, 4]), relu=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_sparse_batch_selection_keeps_exactly_the_flat_top_b_times_k(rows, width, k, skew, levels, relu, seed):
    """Candidates per row, the threshold fallback when a row owns more picks than it offered (skewed
    rows), and ties (few distinct levels): the kept entries are a flat top-B·k of the positive scores."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, width, generator=gen)  # raw pre-activations, or their ReLU: the same selection
    if levels:
        scores = torch.randint(-1, levels, (rows, width), generator=gen).float()
    scores = scores.relu() if relu else scores
    scores *= torch.exp(skew * torch.randn(rows, 1, generator=gen))  # some rows far above the others
    sparse = batch_topk_sparse(scores, k)
    total = min(k * rows, int((scores > 0).sum()))
    if sparse is None:  # only when a row may keep more than half of the latents (ties at the cut counted)
        cut = scores.flatten().topk(min(k * rows, scores.numel())).values.min()
        assert int(((scores >= cut) & (scores > 0)).sum(-1).max()) > width // 2
        return
    idx, keep = sparse
    kept = scores.gather(-1, idx)[keep]
    assert kept.numel() == total and (kept > 0).all()
    assert all(len(set(r[m].tolist())) == int(m.sum()) for r, m in zip(idx, keep))  # no column twice in a row
    flat = scores.flatten().topk(total).values if total else kept  # the largest are the positive ones
    torch.testing.assert_close(kept.sort().values, flat.sort().values)


@settings(max_examples=150, deadline=None)
@given(batch_and_k())
def test_threshold_just_below_the_smallest_kept_value_reproduces_the_batch_rule(case):
    pre, k = case
    codes = batch_topk(pre, k)
    if not (codes > 0).any():
        return
    smallest = codes[codes > 0].min()
    theta = torch.nextafter(smallest, torch.tensor(float("-inf")))
    assert torch.equal(threshold(pre, theta), codes)


def test_trains_recovers_features_and_thresholded_l0_is_near_k(tmp_path):
    features = true_features(48, 24)
    sae = BatchTopKSAE(24, 96, k=4, seed=0)
    trainer = Trainer(sae, TrainConfig(lr=3e-3, warmup_steps=10, log_every=50, checkpoint_every=1000, dead_tokens=4096), tmp_path, 500)
    trainer.init_from_data(sample(features, 4096, torch.Generator().manual_seed(9)))
    gen = torch.Generator().manual_seed(5)
    trainer.fit((sample(features, 256, gen) for _ in range(500)), progress=False)
    x = sample(features, 4096, torch.Generator().manual_seed(11))
    with torch.no_grad():
        codes = sae.encode(x)  # the per-token threshold rule
        assert fvu(x, sae.decode(codes)) < 0.2
        assert 3.0 <= l0(codes) <= 5.5
        cos = torch.nn.functional.normalize(sae.W_dec, dim=1) @ features.T
    assert cos.max(0).values.mean() > 0.83  # measured 0.88 (TopK on the same data: 0.99)
    assert float(sae.theta) > 0 and int(sae.theta_updates) == 500


def test_file_records_the_inference_threshold_and_folds_it(tmp_path):
    sae = BatchTopKSAE(8, 32, k=3, seed=0)
    with torch.no_grad():
        sae.theta.fill_(0.8)
        sae.input_scale.fill_(0.25)
        sae.b_dec.normal_()
    x = torch.randn(64, 8) * 4
    expected = sae.encode(x)
    sae.fold_input_scale()
    torch.testing.assert_close(sae.encode(x), expected)
    save(sae, tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "featurekit.json").read_text())
    assert meta["inference_rule"]["activation"] == "threshold" and abs(meta["inference_rule"]["threshold"] - 3.2) < 1e-6
    torch.testing.assert_close(featurekit.load(tmp_path / "d").encode(x), expected)


def plain_batch_topk(pre, k):
    flat = pre.relu().flatten()
    values, indices = flat.topk(min(k * pre.shape[0], flat.numel()))
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)


@settings(max_examples=200, deadline=None)
@given(batch_and_k(), st.booleans())
def test_candidate_selection_equals_the_plain_full_topk(case, skewed):
    pre, k = case
    if skewed:  # one row far above the rest: it owns more than 4k of the batch's top entries (fallback path)
        pre = pre.clone()
        pre[0] = pre[0].abs() + 100
    assert torch.equal(batch_topk(pre, k), plain_batch_topk(pre, k))


def test_sparse_training_path_matches_dense_values_and_gradients():
    from featurekit.train.losses import auxk_loss, fvu_loss

    torch.manual_seed(0)
    x = torch.nn.functional.normalize(torch.randn(300, 16), dim=1) * 3  # rows of equal norm: no row dominates
    fast, plain = BatchTopKSAE(16, 256, k=5, seed=1), BatchTopKSAE(16, 256, k=5, seed=1)
    dead = torch.rand(256, generator=torch.Generator().manual_seed(2)) < 0.5
    out = fast(x)
    assert not out.pre.requires_grad  # the sparse path ran
    aux = auxk_loss(x - out.x_hat, out.top_pre, fast.W_dec, dead, 4, pre_at=out.pre_at)
    (fvu_loss(x, out.x_hat) + aux).backward()
    pre = (x - plain.b_dec) @ plain.W_enc.T + plain.b_enc
    codes = plain_batch_topk(pre, 5)
    x_hat = codes @ plain.W_dec + plain.b_dec
    (fvu_loss(x, x_hat) + auxk_loss(x - x_hat, pre, plain.W_dec, dead, 4)).backward()
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-5, atol=1e-5)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(fast, name).grad, getattr(plain, name).grad, rtol=1e-4, atol=1e-6, msg=name)


def test_calibrated_threshold_gives_inference_l0_near_k_after_a_short_run(tmp_path):
    """60 steps: the EMA θ still carries the first steps' high cut; `calibrate` (the mean batch cut with the final
    weights) brings the per-token rule's L0 to k on held-out data."""
    features = true_features(48, 24)
    sae = BatchTopKSAE(24, 96, k=4, seed=0)
    trainer = Trainer(sae, TrainConfig(lr=3e-3, warmup_steps=10, log_every=50, checkpoint_every=1000, dead_tokens=4096), tmp_path, 60)
    trainer.init_from_data(sample(features, 4096, torch.Generator().manual_seed(9)))
    gen = torch.Generator().manual_seed(5)
    trainer.fit((sample(features, 256, gen) for _ in range(60)), progress=False)
    x = sample(features, 8192, torch.Generator().manual_seed(11))
    with torch.no_grad():
        ema_l0 = l0(sae.encode(x))
        calib = sae.calibrate([sample(features, 256, gen) * sae.input_scale for _ in range(16)])
        calibrated_l0 = l0(sae.encode(x))
    assert calib["batches"] == 16 and calib["theta"] == float(sae.theta)
    assert abs(calibrated_l0 - 4) < 0.4, (ema_l0, calibrated_l0)
    assert abs(calibrated_l0 - 4) < abs(ema_l0 - 4)
