"""Losses shared by several dictionary methods.

All are computed in fp32 and in the training scale (inputs multiplied by the input scale c).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def fvu_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Batch fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean_batch(x)‖².

    Scale-free, so the loss does not depend on the input scale (as in sparsify's training loss).
    The evaluation FVU uses the whole evaluation set's mean (`evaluate.metrics.fvu`).
    """
    x, x_hat = x.float(), x_hat.float()
    total = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return (x - x_hat).pow(2).sum() / total


def squared_error_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ_d (x − x̂)², averaged over tokens (Anthropic April-2024 recipe)."""
    return (x.float() - x_hat.float()).pow(2).sum(-1).mean()


def auxk_loss(
    residual: torch.Tensor,
    pre: torch.Tensor,
    W_dec: torch.Tensor,
    dead: torch.Tensor,
    k_aux: int,
    pre_at: Callable[[torch.Tensor], torch.Tensor] | None = None,
    signed: bool = False,
) -> torch.Tensor:
    """Aux-k loss of Gao et al. (2024, §A.2; OpenAI `train.py`), in its normalised form.

    Only dead latents compete: their top-k_aux positive pre-activations (k_aux ≤ #dead)
    reconstruct the stop-gradient residual e = x − x̂ without b_dec:

        ê = ReLU(TopK_{k_aux}(π restricted to dead)) W_dec
        L_aux = ‖e − ê‖² / ‖e − mean_batch(e)‖²

    Returns 0 when no latent is dead. The trainer multiplies by auxk_coef (default 1/32).
    `pre_at(idx)` gives the pre-activations at idx with their gradient (default: gather from `pre`).
    `signed` (AbsTopK): dead latents are ranked by |π| and keep their sign (no ReLU).
    """
    n_dead = int(dead.sum())
    if n_dead == 0 or k_aux <= 0:
        return pre.new_zeros(())
    k = min(k_aux, n_dead)
    masked = (pre.abs() if signed else pre).masked_fill(~dead, float("-inf"))
    with torch.no_grad():
        indices = masked.topk(k, dim=-1, sorted=False).indices
    values = pre_at(indices) if pre_at is not None else pre.gather(-1, indices)
    # embedding_bag sums the chosen decoder rows weighted by their codes without materialising
    # an (n, k_aux, d) tensor.
    e_hat = torch.nn.functional.embedding_bag(indices, W_dec, per_sample_weights=values if signed else values.relu(), mode="sum")
    e = residual.detach().float()
    denom = (e - e.mean(0)).pow(2).sum().clamp_min(1e-12)
    return torch.nan_to_num((e - e_hat.float()).pow(2).sum() / denom, nan=0.0)
