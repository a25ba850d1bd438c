"""Losses shared by several dictionary methods.

All are computed in fp32 and in the training scale (inputs multiplied by the input scale c).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..dictionaries.kernels import masked_topk
from .collectives import centered_sum_sq


def fvu_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Batch fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean_batch(x)‖².

    Scale-free, so the loss does not depend on the input scale (as in sparsify's training loss).
    The evaluation FVU uses the whole evaluation set's mean (`evaluate.metrics.fvu`).
    """
    x, x_hat = x.float(), x_hat.float()
    total = centered_sum_sq(x).clamp_min(1e-12)  # data parallel: the global batch's (train/distributed.py)
    return (x - x_hat).pow(2).sum() / total


def squared_error_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ_d (x − x̂)², averaged over tokens (Anthropic April-2024 recipe)."""
    return (x.float() - x_hat.float()).pow(2).sum(-1).mean()


def auxk_loss(
    residual: torch.Tensor,
    pre: torch.Tensor | Callable[[int, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]],
    W_dec: torch.Tensor,
    dead: torch.Tensor,
    k_aux: int,
    pre_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    signed: bool = False,
) -> torch.Tensor:
    """Aux-k loss of Gao et al. (2024, §A.2; OpenAI `train.py`), in its normalised form.

    Only dead latents compete: their top-k_aux positive pre-activations (k_aux ≤ #dead)
    reconstruct the stop-gradient residual e = x − x̂ without b_dec:

        ê = ReLU(TopK_{k_aux}(π restricted to dead)) W_dec
        L_aux = ‖e − ê‖² / ‖e − mean_batch(e)‖²

    Returns 0 when no latent is dead. The trainer multiplies by auxk_coef (default 1/32).
    `pre` is the (N, F) matrix π, or a function (k, among, signed) → (idx, pair_pre) giving each
    token's top k among a set of latents without it (`Output.top_pre`).
    `pre_at(idx, pair_pre)` gives the pre-activations at idx with their gradient, `pair_pre` being their
    values without grad (`Output.pre_at`; default: gather from the tensor `pre`).
    `signed` (AbsTopK): dead latents are ranked by |π| and keep their sign (no ReLU).
    """
    n_dead = int(dead.sum())
    if n_dead == 0 or k_aux <= 0:
        return residual.new_zeros(())
    k = min(k_aux, n_dead)
    indices, pair_pre = pre(k, dead, signed) if callable(pre) else masked_topk(pre, k, dead, signed)
    if pre_at is not None:
        values = pre_at(indices, pair_pre)
    elif callable(pre):
        raise ValueError("auxk_loss: a `pre` function needs `pre_at` for the values' gradient")
    else:
        values = pre.gather(-1, indices)
    # embedding_bag sums the chosen decoder rows weighted by their codes without materialising
    # an (n, k_aux, d) tensor.
    e_hat = torch.nn.functional.embedding_bag(indices, W_dec, per_sample_weights=values if signed else values.relu(), mode="sum")
    e = residual.detach().float()
    denom = centered_sum_sq(e).clamp_min(1e-12)
    return torch.nan_to_num((e - e_hat.float()).pow(2).sum() / denom, nan=0.0)


def zipf_expected_density(density: torch.Tensor, head: float = 0.5) -> torch.Tensor:
    """The firing density each latent would have if the densities followed Zipf's law.

    Rank the latents by density (r = 1 the most frequent), fit log ρ = log C − s·log r by least
    squares on the head of the curve (the ⌈head·F⌉ top ranks with ρ > 0, where Ayonrinde 2024 finds
    the fit good) and return C·r_j^(−s) for every latent j. +inf everywhere when fewer than two
    latents fire (nothing to fit): then only dead latents count as underutilised.
    """
    density = density.float()
    order = density.argsort(descending=True)
    rank = torch.empty_like(density).scatter_(0, order, torch.arange(1, density.numel() + 1, dtype=density.dtype,
                                                                     device=density.device))
    head_n = max(2, math.ceil(head * density.numel()))
    fit = density[order[:head_n]]
    fit = fit[fit > 0]
    if fit.numel() < 2:
        return torch.full_like(density, float("inf"))
    lx = torch.arange(1, fit.numel() + 1, dtype=density.dtype, device=density.device).log()
    ly = fit.log()
    slope = ((lx - lx.mean()) * (ly - ly.mean())).sum() / (lx - lx.mean()).pow(2).sum()
    log_c = ly.mean() - slope * lx.mean()
    return (log_c + slope * rank.log()).exp()


def aux_zipf_loss(
    residual: torch.Tensor,
    pre: torch.Tensor | Callable[[int, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]],
    W_dec: torch.Tensor,
    density: torch.Tensor,
    k_aux: int,
    tau: float = 0.1,
    pre_at: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    signed: bool = False,
) -> torch.Tensor:
    """aux_zipf_loss: the aux-k loss extended from dead latents to underutilised ones.

    Source: Ayonrinde 2024 ("Adaptive Sparse Allocation with Mutual Choice & Feature Choice Sparse
    Autoencoders", arXiv 2411.02124) names the loss — it "generalises aux_k_loss to mitigate dead
    and underutilised features", with a Zipf fit of the feature densities as the expected usage —
    but its formula could not be checked against the paper text (no code was released). This is
    our reconstruction:

        ρ_j   = firing density of latent j (an EMA over training batches)
        ρ̂_j   = Zipf fit of ρ at latent j's rank (`zipf_expected_density`)
        U     = {j : ρ_j < τ·ρ̂_j}        (underutilised; every dead latent is in U)
        L     = auxk_loss(residual, π, W_dec, mask=U, k_aux)

    i.e. the top-k_aux underutilised latents of each token reconstruct the stop-gradient residual
    (normalised MSE, as `auxk_loss`). τ = 0.1 by default (ours). Returns 0 when U is empty.
    """
    underused = density.to(residual.device).float() < tau * zipf_expected_density(density).to(residual.device)
    return auxk_loss(residual, pre, W_dec, underused, k_aux, pre_at=pre_at, signed=signed)
