"""Sparse kernels for dictionaries whose codes have k ≪ F non-zeros per token.

The dense path costs four (N × F × d) matmuls per training step beyond the encoder's forward:
the decoder forward, its two backward products and the encoder's weight gradient. With k
non-zeros per row, all four only need N × k × d work:

* `gather_linear(x, W, b, idx, pre)` returns the pre-activations at `idx` (N, k), taken from an
  already computed `pre` (no grad), and back-propagates sparsely: ∂W[idx[n,j]] += g[n,j]·x[n],
  ∂b[idx[n,j]] += g[n,j], ∂x[n] = Σ_j g[n,j]·W[idx[n,j]].
* `sparse_decode(idx, values, W_dec)` = Σ_j values[n,j]·W_dec[idx[n,j]] through `embedding_bag`.

Both give the same results and gradients as the dense formulas up to fp32 summation order
(tests/dictionaries/test_sparse.py checks this against the plain implementation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: rows per chunk in the weight-gradient accumulation (bounds the (rows, k, d) temporary)
CHUNK = 256


class _GatherLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W, b, idx, pre):
        ctx.save_for_backward(x, W, idx)
        return pre.gather(-1, idx)

    @staticmethod
    def backward(ctx, grad):
        x, W, idx = ctx.saved_tensors
        grad = grad.contiguous()
        grad_W = grad_b = grad_x = None
        if ctx.needs_input_grad[1]:
            grad_W = torch.zeros_like(W)
            for s in range(0, x.shape[0], CHUNK):
                g, i, xs = grad[s:s + CHUNK], idx[s:s + CHUNK], x[s:s + CHUNK]
                grad_W.index_add_(0, i.reshape(-1), (g[:, :, None] * xs[:, None, :]).reshape(-1, x.shape[1]))
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(W.shape[0], dtype=grad.dtype, device=grad.device).index_add_(0, idx.reshape(-1), grad.reshape(-1))
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx, W, per_sample_weights=grad, mode="sum")
        return grad_x, grad_W, grad_b, None, None


def gather_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """(x Wᵀ + b) at columns idx (N, k), with a sparse backward; `pre` = x Wᵀ + b computed without grad."""
    return _GatherLinear.apply(x, W, b, idx, pre.detach())


def sparse_decode(idx: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_j values[n, j] · W_dec[idx[n, j]] → (N, d)."""
    return F.embedding_bag(idx, W_dec, per_sample_weights=values, mode="sum")


def densify(idx: torch.Tensor, values: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Dense (N, F) codes from the sparse form (no grad)."""
    return torch.zeros(idx.shape[0], n_latents, dtype=values.dtype, device=values.device).scatter_(-1, idx, values.detach())


def mask_to_sparse(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A (N, F) bool mask with a varying count per row → (idx, keep), each (N, m), m = the largest
    count (at least 1): row n's kept columns in order, then padding (column 0, keep False) that
    must be weighted by `keep`. Linear in N·F (no sort): for per-token threshold selections."""
    counts = mask.sum(-1)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    rows, cols = mask.nonzero(as_tuple=True)  # row-major order
    slot = torch.arange(rows.numel(), device=mask.device) - (counts.cumsum(0) - counts)[rows]
    idx = torch.zeros(mask.shape[0], width, dtype=torch.long, device=mask.device)
    keep = torch.zeros(mask.shape[0], width, dtype=torch.bool, device=mask.device)
    idx[rows, slot] = cols
    keep[rows, slot] = True
    return idx, keep
