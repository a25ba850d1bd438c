"""The paper's full-batch SNMF (Shafran, Geiger & Geva 2025; official code `factorization/seminmf.py`) on an
in-memory matrix: the test reference the streaming fitter in `featurekit/dictionaries/snmf.py` is checked against
(steps 1–5 of `snmf.py`'s module docstring). Memory grows with the number of tokens; featurekit fits with
`snmf.SNMFFitter` / `snmf.fit_snmf`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from featurekit.dictionaries.snmf import RIDGE, SNMFDictionary, _check, active_neurons, multiplicative_g_step, objective, winner_take_all
from featurekit.errors import FeaturekitError


@dataclass
class DenseFit:
    """`fit_snmf_dense`'s result: the dictionary (unit-norm rows), the matching codes G (n, k) and the loss per iteration."""

    dictionary: SNMFDictionary
    codes: torch.Tensor
    losses: list[float] = field(default_factory=list)
    best_iter: int = -1


@torch.no_grad()
def fit_snmf_dense(x: torch.Tensor, n_latents: int, *, sparsity: float = 0.01, max_iter: int = 2000, patience: int = 1500,
                   tol: float = 1e-4, seed: int = 42, init: str = "random", nnls_iters: int = 30) -> DenseFit:
    """The paper's algorithm (module docstring, steps 1–5) on an in-memory (n, d) matrix of activations."""
    x = x.float()
    n, d = x.shape
    k = n_latents
    _check(d, k, sparsity, nnls_iters)
    m = active_neurons(sparsity, d)
    gen = torch.Generator().manual_seed(seed)
    if init == "random":
        g = torch.rand(n, k, generator=gen).clamp_min(1e-6)
    elif init == "svd":  # the code's init_svd, transposed: G = U_k √Σ_k ≥ 1e-6 (W = √Σ_k V_kᵀ is replaced by step 1)
        if k > min(n, d):
            raise FeaturekitError(f"init='svd' needs n_latents ≤ min(n, d) = {min(n, d)}, got {k}")
        u, s, _ = torch.linalg.svd(x, full_matrices=False)
        g = (u[:, :k] * s[:k].sqrt()).clamp_min(1e-6)
    else:
        raise FeaturekitError(f"unknown SNMF init {init!r}; use 'random' or 'svd'")
    eye = torch.eye(k)
    best, best_w, best_g, best_iter, since = math.inf, None, None, -1, 0
    losses = []
    for it in range(max_iter):
        w = torch.linalg.solve(g.T @ g + RIDGE * eye, g.T @ x)     # 1. F-step
        w = winner_take_all(w, m)                                  # 2. WTA
        norms = g.norm(dim=0).clamp_min(1e-8)                      # 3. scale fix
        g, w = g / norms, w * norms[:, None]
        g = multiplicative_g_step(g, x @ w.T, w @ w.T)             # 4. G-step
        loss = objective(x, g, w)                                  # 5. best pair, patience
        losses.append(loss)
        if loss < best - tol:
            best, best_w, best_g, best_iter, since = loss, w.clone(), g.clone(), it, 0
        else:
            since += 1
            if since >= patience:
                break
    if best_w is None:
        raise FeaturekitError("the SNMF fit produced no finite loss; check the activations for NaN/Inf")
    dictionary = SNMFDictionary(d, k, sparsity=sparsity, nnls_iters=nnls_iters)
    norms = best_w.norm(dim=1)
    dictionary.set_features(best_w)
    return DenseFit(dictionary, best_g * norms, losses, best_iter)
