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
