"""Measurements on a trained MoE LM: does the gate score follow the experts' true sparsity?

``router_l0_correlation`` reproduces the paper's Fig. 9 question on any MoE block of a MoexLM: over
every (token, expert) pair, the Pearson correlation between the router's score for that expert (its
logit: −expected active units / D / temperature for MoE-X, ``W_r x`` for Switch) and the expert's
true ℓ0 on that token (how many of its D pre-activations are positive, computed by running every
expert). The paper reports a strong negative correlation for the sparsity router and none for a
learned top-k router. Also: the mean ℓ0 of the experts the router picked against the mean over all.
"""

from __future__ import annotations

import torch

from ..errors import FeaturekitError
from ..models.hooks import capture_activations
from ..models.moexlm.layers import MoE, true_active
from ..models.moexlm.lm import MoexLM


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denom = (a.norm() * b.norm()).item()
    return float((a @ b).item() / denom) if denom > 0 else float("nan")


@torch.no_grad()
def router_l0_correlation(model: MoexLM, input_ids: torch.Tensor) -> list[dict]:
    """One row per MoE block: ``pearson`` (gate score vs true ℓ0 over token × expert pairs),
    ``pearson_within_token`` (the same after removing each token's mean over experts: does the score
    rank the experts of one token), ``picked_l0`` and ``mean_l0`` (mean true ℓ0 of the picked experts
    and of all experts), ``tokens``."""
    layers = [i for i, blk in enumerate(model.blocks) if isinstance(blk.mlp, MoE)]
    if not layers:
        raise FeaturekitError(f"this model's MLPs are {model.config.mlp!r}: router_l0_correlation needs an MoE "
                              f"(switch or moex)")
    model.eval()
    acts = capture_activations(model, input_ids, [f"mlp_in.{i}" for i in layers])
    rows = []
    for i in layers:
        moe = model.blocks[i].mlp
        x = acts[f"mlp_in.{i}"].reshape(-1, model.config.d_model).clone()
        score, l0 = moe.router(x, moe), true_active(x, moe)
        picked = score.topk(moe.top_k, dim=-1).indices
        rows.append({"layer": i, "pearson": _pearson(score, l0),
                     "pearson_within_token": _pearson(score - score.mean(1, keepdim=True), l0 - l0.mean(1, keepdim=True)),
                     "picked_l0": float(l0.gather(1, picked).mean()), "mean_l0": float(l0.mean()),
                     "expert_width": moe.expert_hidden, "tokens": x.shape[0]})
    return rows
