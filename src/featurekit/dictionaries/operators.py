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


def batch_topk_sparse(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The B·k largest entries of non-negative `scores` (B, F), in sparse form, without a top-k over
    all B·F entries — or None when it can't be sure.

    Each row's 4k largest scores are the candidates and the B·k largest candidates are kept. That
    is exact unless some row had all its candidates kept (it might own more): then None.
    Returns (idx, keep): candidate columns (B, 4k) and a bool mask of the kept ones (score > 0).
    """
    rows, width = scores.shape
    per_row = min(4 * k, width)
    if per_row == width:
        return None
    cand_scores, cand_idx = scores.topk(per_row, dim=-1, sorted=False)
    flat_pos = cand_scores.flatten().topk(min(k * rows, cand_scores.numel()), sorted=False).indices
    if bool((torch.bincount(flat_pos // per_row, minlength=rows) == per_row).any()):
        return None
    keep = torch.zeros(cand_scores.numel(), dtype=torch.bool, device=scores.device).index_fill_(0, flat_pos, True)
    return cand_idx, keep.view_as(cand_scores) & (cand_scores > 0)


def _batch_select(pre: torch.Tensor, scores: torch.Tensor, k: int) -> torch.Tensor:
    """Keep `pre` where `scores` is among the batch's B·k largest (and positive); zero elsewhere."""
    if pre.ndim != 2:
        raise ValueError(f"batch selection needs a (B, F) batch, got shape {tuple(pre.shape)}")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    sparse = batch_topk_sparse(scores, k)
    if sparse is not None:
        idx, keep = sparse
        return torch.zeros_like(pre).scatter_(-1, idx, pre.gather(-1, idx) * keep)
    flat = scores.flatten()
    top = flat.topk(min(k * pre.shape[0], flat.numel()), sorted=False)
    kept = torch.zeros_like(flat, dtype=torch.bool).index_fill_(0, top.indices, True) & (flat > 0)
    return pre * kept.view_as(pre)


def batch_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """BatchTopK (Bussmann, Leask & Nanda 2024, §2.1): ReLU, then keep the B·k largest entries of
    the whole (B, F) batch and zero the rest. Rows get different numbers of latents; the batch mean
    is exactly k when at least B·k entries are positive (zeros are never kept). Batch-coupled: use
    `threshold` at inference. Uses `batch_topk_sparse` when it is exact, else the full top-k; both
    select the same set (tested against the plain flatten-and-top-k; ties at the cut aside).
    """
    return _batch_select(pre.relu(), pre.relu(), k)


def abs_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """AbsTopK (Zhu, Khalili & Zhu 2025, arXiv 2510.00404, §8.2 of the spec): keep each row's k
    largest-magnitude entries WITH their sign (the hard-thresholding operator H_k), zero the rest."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    idx = pre.abs().topk(min(k, pre.shape[-1]), dim=-1, sorted=False).indices
    return torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx))


def batch_abs_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Batch AbsTopK (the official code's "BatchAbsoluteK"): keep the B·k largest |π| of the batch, signed."""
    return _batch_select(pre, pre.abs(), k)


def threshold(pre: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """Per-token JumpReLU-style rule: f = ReLU(pre) · 1[pre > θ] (θ a scalar or per-latent vector).

    The inference form of batch-coupled rules (research/seed-methods-sae.md §0.7)."""
    return pre.relu() * (pre > theta)


def abs_threshold(pre: torch.Tensor, theta: torch.Tensor | float) -> torch.Tensor:
    """Signed per-token rule: f = π · 1[|π| > θ] (the inference form of batch AbsTopK)."""
    return pre * (pre.abs() > theta)


def jumprelu(pre: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """JumpReLU_θ(π) = π · H(π − θ), θ per latent (Rajamanoharan et al. 2024). Inference form: no
    straight-through estimator (that lives in `dictionaries/jumprelu.py`)."""
    return pre * (pre > theta)
