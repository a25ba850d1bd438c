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
    aux = auxk_loss(x - out.x_hat, out.top_pre, fast.W_dec, dead, 4, pre_at=out.pre_at)
    loss_fast = fvu_loss(x, out.x_hat) + aux
    loss_fast.backward()
    x_hat, codes, pre = dense_forward(plain, x)
    loss_plain = fvu_loss(x, x_hat) + auxk_loss(x - x_hat, pre, plain.W_dec, dead, 4)
    loss_plain.backward()

    torch.testing.assert_close(out.x_hat, x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.codes, codes)
    torch.testing.assert_close(loss_fast, loss_plain)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(fast, name).grad, getattr(plain, name).grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("signed", [False, True])
def test_exact_topk_keeps_no_preactivation_matrix_and_computes_aux_columns_on_demand(signed):
    """Exact TopK frees its (N, F) pre-activations after the selection; `Output.top_pre` computes the
    requested latents' columns only and agrees with the masked top-k of the whole matrix."""
    from featurekit.dictionaries import AbsTopKSAE
    from featurekit.dictionaries.kernels import masked_topk

    torch.manual_seed(0)
    sae = (AbsTopKSAE if signed else TopKSAE)(24, 96, k=5, seed=3)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-0.5, 0.5, 96))
    x = torch.randn(40, 24) * 2
    among = torch.rand(96, generator=torch.Generator().manual_seed(4)) < 0.3
    out = sae(x)
    assert out.pre is None and out.has_pre
    idx, at = out.top_pre(7, among, signed)
    full = ((x - sae.b_dec) @ sae.W_enc.T + sae.b_enc).detach()
    ref_idx, ref_at = masked_topk(full, 7, among, signed)
    assert among[idx].all()
    torch.testing.assert_close(at.sort(-1).values, ref_at.sort(-1).values, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(idx.sort(-1).values, ref_idx.sort(-1).values)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the forward's precision is kept for the aux columns
        low = sae(x)
    idx, at = low.top_pre(7, among, signed)
    assert at.dtype == torch.bfloat16
    exact = low.pre_at(idx, at)  # recomputed in fp32 at the chosen pairs
    assert exact.dtype == torch.float32
    torch.testing.assert_close(exact, full.gather(-1, idx), rtol=1e-5, atol=1e-5)
