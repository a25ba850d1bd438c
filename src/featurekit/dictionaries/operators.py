"""Sparsity operators: pure functions from pre-activations to codes.

Each takes `pre` of shape (..., F) and returns codes of the same shape. They hold no state and
have property tests of their own (tests/dictionaries/test_operators.py).
"""

from __future__ import annotations

import torch


def topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest entries of each row, zero the rest, then ReLU.

    TopK precedes the ReLU (Gao et al. 2024, `TopK.forward`): when fewer than k entries are
    positive, the row has fewer than k non-zeros. Ties at the k-th value are broken by
    `torch.topk` (lowest index first on CPU), so exactly min(k, F) entries are selected.
    """
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    k = min(k, pre.shape[-1])
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre).scatter(-1, indices, values.relu())


def topk_indices(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The sparse form of `topk`: (values after ReLU, indices), each of shape (..., k)."""
    k = min(k, pre.shape[-1])
    values, indices = pre.topk(k, dim=-1, sorted=False)
    return values.relu(), indices


def relu(pre: torch.Tensor) -> torch.Tensor:
    """f = max(pre, 0)."""
    return pre.relu()


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """BatchTopK (Bussmann, Leask & Nanda 2024, §2.1): ReLU, then keep the B·k largest entries of
    the whole (B, F) batch and zero the rest. Rows get different numbers of latents; the batch mean
    is exactly k when at least B·k entries are positive (fewer otherwise: zeros are never kept).
    Ties at the cut are broken by `torch.topk`. Batch-coupled: use `threshold` at inference.
    """
    if pre.ndim != 2:
        raise ValueError(f"batch_topk needs a (B, F) batch, got shape {tuple(pre.shape)}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    acts = pre.relu()
    flat = acts.flatten()
    n = min(k * pre.shape[0], flat.numel())
    values, indices = flat.topk(n, sorted=False)
    return torch.zeros_like(flat).scatter(0, indices, values).view_as(pre)


def threshold(pre: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """Per-token JumpReLU-style rule: f = ReLU(pre) · 1[pre > θ] (θ a scalar or per-latent vector).

    The inference form of batch-coupled rules (research/seed-methods-sae.md §0.7)."""
    return pre.relu() * (pre > theta)
