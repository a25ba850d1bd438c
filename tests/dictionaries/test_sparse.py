"""The sparse training path gives the dense formula's outputs and gradients (fp32 tolerance)."""

import pytest
import torch

from featurekit.dictionaries import TopKSAE
from featurekit.dictionaries.operators import topk
from featurekit.train.losses import auxk_loss, fvu_loss


def dense_forward(sae, x):
    pre = (x - sae.b_dec) @ sae.W_enc.T + sae.b_enc
    codes = topk(pre, sae.k)
    return codes @ sae.W_dec + sae.b_dec, codes, pre


@pytest.mark.parametrize("n,d,F,k", [(7, 5, 11, 3), (300, 32, 200, 8), (513, 16, 64, 64)])
def test_sparse_topk_matches_dense_values_and_gradients(n, d, F, k):
    torch.manual_seed(0)
    x = torch.randn(n, d) * 3
    fast, plain = TopKSAE(d, F, k=k, seed=1), TopKSAE(d, F, k=k, seed=1)
    with torch.no_grad():
        for sae in (fast, plain):
            sae.b_dec.copy_(torch.linspace(-1, 1, d))
            sae.b_enc.copy_(torch.linspace(-0.5, 0.5, F))
    dead = torch.rand(F, generator=torch.Generator().manual_seed(2)) < 0.5

    out = fast(x)
    loss_fast = fvu_loss(x, out.x_hat) + auxk_loss(x - out.x_hat, out.pre, fast.W_dec, dead, 4, pre_at=lambda i: fast.pre_at(x, i, out.pre))
    loss_fast.backward()
    x_hat, codes, pre = dense_forward(plain, x)
    loss_plain = fvu_loss(x, x_hat) + auxk_loss(x - x_hat, pre, plain.W_dec, dead, 4)
    loss_plain.backward()

    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(loss_fast, loss_plain)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(fast, name).grad, getattr(plain, name).grad, rtol=1e-4, atol=1e-6, msg=name)
