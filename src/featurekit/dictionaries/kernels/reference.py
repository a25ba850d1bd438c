"""The plain dense reference of the kernels, and the switch that makes every kernel use it.

Each fast kernel computes one of these formulas with other memory traffic (sparse products, fused
passes, a bf16 selection certified exact); inside `plain_kernels()` the kernels compute the formulas
below instead, with torch's own autograd, and the tests train through both and compare
(tests/train/test_fast_paths.py). The switch is a process-wide test mode, like torch's
`use_deterministic_algorithms`: it holds no state of a run and training never sets it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

_plain = False


@contextmanager
def plain_kernels() -> Iterator[None]:
    """Inside, every kernel runs its plain dense formula (below): the reference the fast paths are tested against."""
    global _plain
    before, _plain = _plain, True
    try:
        yield
    finally:
        _plain = before


def plain_active() -> bool:
    """True inside `plain_kernels()`."""
    return _plain


def encoder_preact(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """π = x Wᵀ + b."""
    return torch.addmm(b, x, W.T) if x.dim() == 2 else x @ W.T + b


def gather_linear(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, idx: torch.Tensor, shift: torch.Tensor | None = None,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
    """((x − shift) Wᵀ + b) at columns idx (N, m), 0 where `keep` is False."""
    x = x if shift is None else x - shift
    values = (x @ W.T + b).gather(-1, idx)
    return values if keep is None else values * keep


def densify_with_grad(idx: torch.Tensor, values: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Dense (N, F) codes from the sparse form, differentiable in `values`. Summed, so padding slots (value 0,
    possibly repeating a real column) never overwrite a code."""
    return torch.zeros(idx.shape[0], n_latents, dtype=values.dtype, device=values.device).scatter_add(-1, idx, values)


def sparse_decode(idx: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_j values[n, j] · W_dec[idx[n, j]] (over the kept slots) → (N, d)."""
    return densify_with_grad(idx, values if keep is None else values * keep, W_dec.shape[0]) @ W_dec


def row_topk(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, indices) of the k largest entries of each row, unsorted."""
    return scores.topk(min(k, scores.shape[-1]), dim=-1, sorted=False)
