"""Metrics against hand-computed values, and the streaming accumulator against the one-shot formula."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.evaluate import metrics


def test_fvu_by_hand():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 3.0]])  # mean (2, 1)
    x_hat = torch.tensor([[1.0, 1.0], [3.0, 0.0], [2.0, 2.0]])
    # Σ‖x−x̂‖² = 1 + 0 + 1 = 2;  Σ‖x−x̄‖² = (1+1) + (1+1) + (0+4) = 8
    assert metrics.fvu(x, x_hat) == 0.25


def test_fvu_uses_the_set_mean_not_zero():
    x = torch.tensor([[10.0], [12.0]])  # variance about the mean: 2, about zero: 244
    assert metrics.fvu(x, torch.tensor([[11.0], [11.0]])) == 1.0


def test_l0_counts_signed_nonzeros():
    codes = torch.tensor([[0.0, -1.0, 2.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert metrics.l0(codes) == (2 + 0 + 3) / 3


def test_loss_recovered_by_hand():
    assert metrics.loss_recovered(ce_clean=2.0, ce_spliced=2.5, ce_zero=7.0) == 0.9
    assert metrics.loss_recovered(2.0, 2.0, 7.0) == 1.0
    assert metrics.loss_recovered(2.0, 7.0, 7.0) == 0.0


def test_cross_entropy_and_kl_by_hand():
    # vocabulary of 2; logits chosen so probabilities are (0.5, 0.5) and (0.8, 0.2)
    logits = torch.tensor([[[0.0, 0.0], [math.log(4.0), 0.0], [0.0, 0.0]]])
    ids = torch.tensor([[0, 1, 0]])
    ce = metrics.token_cross_entropy(logits, ids)  # position 0 predicts token 1 (p=.5), position 1 predicts 0 (p=.8)
    torch.testing.assert_close(ce, torch.tensor([[math.log(2.0), -math.log(0.8)]]))
    kl = metrics.token_kl(logits[:, :2], logits[:, [0, 0]])
    expected = 0.8 * math.log(0.8 / 0.5) + 0.2 * math.log(0.2 / 0.5)
    torch.testing.assert_close(kl, torch.tensor([[0.0, expected]]))


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 60), st.integers(1, 8), st.integers(1, 5), st.integers(0, 10_000))
def test_streaming_stats_equal_the_whole_set(n, d, chunks, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) * 3 + 5
    x_hat = x + torch.randn(n, d, generator=g) * 0.5
    codes = torch.randn(n, 7, generator=g).relu()
    stats = metrics.ReconstructionStats(7)
    for part in torch.arange(n).chunk(chunks):
        stats.update(x[part], x_hat[part], codes[part])
    r = stats.result()
    assert math.isclose(r["fvu"], metrics.fvu(x, x_hat), rel_tol=1e-9)
    assert math.isclose(r["l0"], metrics.l0(codes), rel_tol=1e-12)
    density = (codes != 0).double().mean(0)
    assert r["dead_fraction"] == float((density == 0).double().mean())
    assert r["dense_fraction"] == float((density > 0.1).double().mean())
    assert r["n_tokens"] == n
