"""ReLU SAE with the decoder-norm-weighted L1 penalty (Anthropic, "Circuits Updates – April 2024").

    f = ReLU(x W_encᵀ + b_enc),   x̂ = f W_dec + b_dec
    L = Σ_i ‖x − x̂‖² (summed over d, mean over tokens) + λ Σ_j f_j ‖d_j‖₂

Note: no b_dec subtraction before encoding in this recipe; the decoder norms are free (no
constraint) and enter the penalty, so the penalty cannot be gamed by growing decoder rows.
`fold_decoder_norms()` rescales to unit-norm rows (f_j ← f_j‖d_j‖) without changing x̂, which
`save` applies so features are comparable. Initialisation: W = randn(d, F) with columns of norm
0.1, W_dec = Wᵀ, W_enc = Wᵀ, biases 0. λ is ramped up linearly by the trainer
(`train.sparsity_warmup_fraction`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import Dictionary, Output
from .operators import relu
from .registry import register


@dataclass
class ReLUParams:
    l1_coefficient: float = 5.0  #: λ of the decoder-norm-weighted L1 penalty (training scale: mean input norm √d)


@register(ReLUParams)
class ReLUSAE(Dictionary):
    method = "relu"
    unit_norm_decoder = False
    recon_loss = "squared_error"

    def __init__(self, d_in: int, n_latents: int, l1_coefficient: float = 5.0, seed: int | None = None):
        super().__init__(d_in, n_latents)
        self.l1_coefficient = float(l1_coefficient)
        #: multiplies λ; the trainer ramps it from 0 to 1 (not saved: a training-time schedule).
        self.sparsity_scale = 1.0
        self.init_tied(seed, row_norm=0.1)

    def pre_activation(self, x_scaled: torch.Tensor) -> torch.Tensor:
        return x_scaled @ self.W_enc.T + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return relu(pre)

    def extra_losses(self, x: torch.Tensor, out: Output) -> dict[str, torch.Tensor]:
        """λ · mean over tokens of Σ_j f_j ‖d_j‖."""
        penalty = (out.codes * self.W_dec.norm(dim=1)).sum(-1).mean()
        return {"l1": self.l1_coefficient * self.sparsity_scale * penalty}

    @torch.no_grad()
    def fold_decoder_norms(self) -> None:
        """d_j ← d_j/‖d_j‖, e_j ← e_j‖d_j‖, b_enc,j ← b_enc,j‖d_j‖ (x̂ unchanged, codes in unit-norm units)."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-12)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[:, None])
        self.b_enc.mul_(norms)

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "relu"}

    def hyperparams(self) -> dict[str, Any]:
        return {"l1_coefficient": self.l1_coefficient}
