import torch

from featurekit.train.dead import DeadLatentTracker
from featurekit.train.losses import auxk_loss, fvu_loss
from featurekit.train.schedule import lr_factor


def test_auxk_uses_only_dead_latents_and_matches_dense_formula():
    g = torch.Generator().manual_seed(0)
    pre, W = torch.randn(5, 10, generator=g), torch.randn(10, 4, generator=g)
    residual = torch.randn(5, 4, generator=g)
    dead = torch.zeros(10, dtype=torch.bool)
    assert auxk_loss(residual, pre, W, dead, 3) == 0
    dead[[1, 4, 7, 8]] = True
    masked = pre.masked_fill(~dead, float("-inf"))
    v, i = masked.topk(3, dim=-1)
    dense = torch.zeros_like(pre).scatter(-1, i, v.relu())
    e_hat = dense @ W
    expected = (residual - e_hat).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    torch.testing.assert_close(auxk_loss(residual, pre, W, dead, 3), expected)


def test_fvu_loss_is_scale_free():
    x, x_hat = torch.randn(20, 6), torch.randn(20, 6)
    torch.testing.assert_close(fvu_loss(x, x_hat), fvu_loss(7 * x, 7 * x_hat))


def test_schedule_warms_up_holds_and_decays_to_zero():
    f = [lr_factor(s, 100, 10, 0.2) for s in range(100)]
    assert f[0] == 0.1 and f[9] == 1.0 and f[50] == 1.0 and f[80] == 1.0
    assert f[90] == 0.5 and f[99] == 0.05 and all(a >= b for a, b in zip(f[80:], f[81:]))


def test_dead_tracker_counts_tokens_since_fired():
    t = DeadLatentTracker(3, window=10)
    t.update(torch.tensor([[1.0, 0.0, 0.0]] * 6))
    t.update(torch.tensor([[0.0, -2.0, 0.0]] * 6))  # a negative code counts as firing
    assert t.tokens_since_fired.tolist() == [6, 0, 12]
    assert t.dead.tolist() == [False, False, True]
