"""Synthetic activations with known features, shared by the training tests."""

import torch

from featurekit.data.batch import ActivationBatch


def true_features(n: int, d: int, seed: int = 0) -> torch.Tensor:
    """n random unit vectors in d dimensions. The generator is offset from `seed` so the true features
    never coincide with a dictionary's random initialisation (`Dictionary.init_tied(seed)` draws the
    same randn for the same seed): recovery must be learned, not inherited."""
    return torch.nn.functional.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(10_007 + seed)), dim=1)


def sample(features: torch.Tensor, n: int, gen: torch.Generator, p: float = 0.05) -> torch.Tensor:
    """Sparse non-negative mixtures of the true features, plus an offset."""
    coeff = (torch.rand(n, features.shape[0], generator=gen) < p) * torch.rand(n, features.shape[0], generator=gen) * 4
    return coeff @ features + 2.0


def batches(features: torch.Tensor, n_batches: int, size: int, site: str, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    for b in range(n_batches):
        x = sample(features, size, gen)
        ar = torch.arange(size)
        yield ActivationBatch(acts={site: x}, token_ids=ar % 7, context_idx=b * size + ar // 16, position=ar % 16)


def signed_sample(features: torch.Tensor, n: int, gen: torch.Generator, p: float = 0.06) -> torch.Tensor:
    """Bidirectional features: each active feature is used with a random sign, magnitude in [1, 4)."""
    shape = (n, features.shape[0])
    on = torch.rand(shape, generator=gen) < p
    magnitude = torch.rand(shape, generator=gen) * 3 + 1
    sign = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return (on * magnitude * sign) @ features
