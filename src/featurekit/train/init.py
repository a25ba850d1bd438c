"""Data-dependent initialisation: the input scale and b_dec."""

from __future__ import annotations

import math

import torch

from ..errors import FeaturekitError


def mean_norm_scale(sample: torch.Tensor) -> float:
    """c = √d / E‖x‖₂, so that scaled inputs have mean norm √d (SAELens "expected_average_only_in")."""
    mean_norm = sample.float().norm(dim=-1).mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise FeaturekitError(f"cannot normalise: the mean activation norm is {mean_norm}; check the harvested "
                              f"activations (all zero or non-finite?) or set train.normalize=none")
    return math.sqrt(sample.shape[-1]) / mean_norm


def geometric_median(points: torch.Tensor, iters: int = 100, tol: float = 1e-5) -> torch.Tensor:
    """Weiszfeld's algorithm: m ← Σ wᵢxᵢ / Σ wᵢ with wᵢ = 1/‖xᵢ − m‖, starting from the mean."""
    x = points.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(1e-8)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() <= tol * m.norm().clamp_min(1e-12):
            m = new
            break
        m = new
    return m.to(points.dtype)
