"""Linear probes for sparse probing: latent selection by class mean difference, logistic regression, PCA.

All functions take document features `x` (n, d) and boolean labels `y` (n,) and are deterministic.

- `mean_difference_latents(x, y, k)`: the k columns with the largest |mean(x[y]) − mean(x[¬y])|
  (ties broken by the lower index), as SAEBench chooses the latents of a k-sparse probe.
- `fit_logistic(x, y, weights=None)`: logistic regression on standardised columns (mean and standard deviation of
  the training rows; a constant column stays 0) minimising
      mean_i log(1 + exp(−s_i (w·z_i + b))) + ‖w‖² / (2 C n),   s_i = ±1,
  i.e. scikit-learn's default L2 objective (C = 1) divided by n; solved by L-BFGS in float64.
- `pca_basis(x, k)`: the top-k principal directions of the training rows (centred), for the PCA baseline.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import FeaturekitError


def _check(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise FeaturekitError(f"probe features must be (n, d) and labels (n,), got {tuple(x.shape)} and {tuple(y.shape)}")
    if y.dtype != torch.bool or y.all() or not y.any():
        raise FeaturekitError("probe labels must be booleans with both classes present")


def mean_difference_latents(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (k,) of the columns whose class means differ most in absolute value, largest first."""
    _check(x, y)
    if not 1 <= k <= x.shape[1]:
        raise FeaturekitError(f"k = {k} latents must be between 1 and the {x.shape[1]} columns")
    diff = (x[y].double().mean(0) - x[~y].double().mean(0)).abs()
    return torch.argsort(-diff, stable=True)[:k]


@dataclass
class LogisticProbe:
    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    bias: float

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.mean) / self.scale) @ self.weight + self.bias

    def accuracy(self, x: torch.Tensor, y: torch.Tensor) -> float:
        return float(((self.logits(x) > 0) == y).double().mean())


def fit_logistic(x: torch.Tensor, y: torch.Tensor, c: float = 1.0, max_iter: int = 200,
                 weights: torch.Tensor | None = None) -> LogisticProbe:
    """The L2-regularised logistic regression of the module docstring; `weights` (n,) weight each row's loss
    (scikit-learn's sample_weight; e.g. `absorption.balanced_weights` for class_weight="balanced")."""
    _check(x, y)
    if weights is not None and (weights.shape != y.shape or bool((weights < 0).any())):
        raise FeaturekitError(f"probe weights must be non-negative and shaped like the labels {tuple(y.shape)}, got {tuple(weights.shape)}")
    x = x.double()
    mean = x.mean(0)
    scale = x.std(0, unbiased=False)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    z = (x - mean) / scale
    target = y.double()
    row_weights = None if weights is None else weights.double()
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        w, b = params[:-1], params[-1]
        fit = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, target, weight=row_weights)
        loss = fit + w.square().sum() / (2 * c * len(x))
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = params.detach()
    return LogisticProbe(mean, scale, w[:-1].clone(), float(w[-1]))


def pca_basis(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (d,), components (d, k)): project with (x − mean) @ components."""
    if x.ndim != 2 or not 1 <= k <= min(x.shape):
        raise FeaturekitError(f"PCA needs (n, d) rows and 1 <= k <= min(n, d), got {tuple(x.shape)} and k = {k}")
    x = x.double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, vh[:k].T
