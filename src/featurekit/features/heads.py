"""Attention-output SAEs: which heads a feature belongs to (Kissane, Krzyzanowski, Bloom, Conmy, Nanda,
"Interpreting Attention Layer Outputs with Sparse Autoencoders", arXiv 2406.17759, §3 / their code).

A dictionary trained on `attn_z.L` (the per-head outputs before the output projection, heads
concatenated: width n_heads · d_head) has decoder rows that split into one block per head. Feature
i's weight-based share of head h is

    share[i, h] = ‖W_dec[i, h-block]‖₂ / Σ_h' ‖W_dec[i, h'-block]‖₂

(a row in the simplex). For each head, its top features are the live features with the largest
share; a feature is "mostly" head h when share[i, h] ≥ 0.5.
"""

from __future__ import annotations

import torch

from ..errors import FeaturekitError


def head_shares(W_dec: torch.Tensor, n_heads: int) -> torch.Tensor:
    """(F, n_heads) share of each feature's decoder norm per head; rows sum to 1 (0 for a zero row)."""
    n_latents, width = W_dec.shape
    if n_heads <= 0 or width % n_heads:
        raise FeaturekitError(f"a decoder of width {width} does not split into {n_heads} heads; "
                              f"train the dictionary on an attn_z site of this model")
    norms = W_dec.detach().float().reshape(n_latents, n_heads, width // n_heads).norm(dim=-1)
    return norms / norms.sum(-1, keepdim=True).clamp_min(1e-12)


def head_summary(W_dec: torch.Tensor, n_heads: int, density: torch.Tensor | None = None, top: int = 10) -> dict:
    """Per head: its top live features by share (feature, share, density), how many features are
    mostly it (share ≥ 0.5); per feature: its dominant head and share. `density` (F,) marks the
    live features (> 0); None counts every feature as live."""
    shares = head_shares(W_dec, n_heads)
    live = torch.ones(shares.shape[0], dtype=torch.bool) if density is None else density.cpu() > 0
    dominant_share, dominant = shares.max(dim=1)
    heads = []
    for h in range(n_heads):
        col = shares[:, h].masked_fill(~live, -1.0)
        order = col.argsort(descending=True)[:min(top, int(live.sum()))]
        heads.append({
            "head": h,
            "features_mostly_here": int(((dominant == h) & (dominant_share >= 0.5) & live).sum()),
            "top_features": [{"feature": int(i), "share": round(float(shares[i, h]), 4),
                              **({"density": float(density[i])} if density is not None else {})} for i in order],
        })
    return {
        "n_heads": n_heads,
        "head_dim": W_dec.shape[1] // n_heads,
        "n_live": int(live.sum()),
        "single_head_fraction": float(((dominant_share >= 0.5) & live).sum() / live.sum().clamp_min(1)),
        "heads": heads,
        "dominant_head": dominant.tolist(),
        "dominant_share": [round(float(s), 4) for s in dominant_share],
    }
