"""g-SAE: gradient-informed TopK selection (Olmo, Wilson, Forsey, Hepner, Howe, Wingate, "Features that
Make a Difference: Leveraging Gradients for Improved Dictionary Learning", Findings of NAACL 2025,
arXiv 2411.10397). No official code was found; the selection score follows the paper's summary
(β z ⊙ |W_decᵀ ∇ₓL| added to z); the rest is ours and marked so.

Training (needs g = ∇ₓ L_LM, the gradient of the model's next-token loss at the site, harvested
beside the activations with `data.gradients=true`; `models.hooks.capture_gradients`):

    z     = ReLU((x − b_dec) W_encᵀ + b_enc)
    a     = |g W_decᵀ|                 per-latent |directional derivative| of the loss along d_j
    a     ← a / mean(a)                over the batch [ours: makes β independent of the loss scale]
    idx   = TopK_k(z ⊙ (1 + β a))      selection favours latents whose removal would change the loss
    f     = z at idx, 0 elsewhere      the kept values are the ordinary activations
    x̂    = f W_dec + b_dec

z_j·(d_j·g) is the first-order (attribution-patching) estimate of the loss change from ablating
latent j. β = 0 is TopK. The gradient is data: nothing differentiates through it.
Inference: gradients are usually unavailable, so `encode` is plain TopK (β = 0), which the file
records; `encode_with_gradient(x, g)` runs the training rule when a gradient is at hand.
Initialisation, unit-norm decoder and aux-k as for TopK.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FeaturekitError
from . import kernels
from .base import Output
from .registry import check_k, register
from .topk import TopKSAE


@dataclass
class GSAEParams:
    k: int = 32  #: latents kept per token
    beta: float = 1.0  #: weight of the gradient term in the selection score (0 = TopK); needs data.gradients=true

    def check(self, n_latents: int) -> None:
        check_k(self.k, n_latents)
        if self.beta < 0:
            raise FeaturekitError(f"dictionary.beta must be >= 0 (0 is TopK), got {self.beta}")


@register(GSAEParams)
class GradientSAE(TopKSAE):
    method = "gsae"
    needs_gradient = True

    def __init__(self, d_in: int, n_latents: int, k: int = 32, beta: float = 1.0, seed: int | None = None):
        super().__init__(d_in, n_latents, k=k, seed=seed)
        if beta < 0:
            raise FeaturekitError(f"g-SAE beta must be >= 0 (0 is TopK), got {beta}")
        self.beta = float(beta)

    def gradient_scores(self, grad: torch.Tensor) -> torch.Tensor:
        """a = |g W_decᵀ| / mean over the batch: (B, F), no gradient."""
        with torch.no_grad():
            a = (grad.to(self.W_dec.dtype) @ self.W_dec.T).abs()
            return a / a.mean().clamp_min(1e-12)

    def forward(self, x: torch.Tensor, grad: torch.Tensor | None = None) -> Output:
        """Training forward; without `grad` it is TopK's."""
        if grad is None:
            return super().forward(x)
        x = self._check_input(x)
        if grad.shape != x.shape:
            raise FeaturekitError(f"g-SAE gradient has shape {tuple(grad.shape)} but the activations {tuple(x.shape)}; "
                                  "harvest with data.gradients=true so each token carries its own gradient")
        with torch.no_grad():
            pre = self.encoder.pre(x)                                           # π
            score = pre.relu() * (1 + self.beta * self.gradient_scores(grad))  # z ⊙ (1 + β a)
            idx = score.topk(self.k, dim=-1, sorted=False).indices
        return self.sparse_output(x, kernels.Picked(idx, pre=pre), act=torch.relu)

    @torch.no_grad()
    def encode_with_gradient(self, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The training rule on raw activations and their LM-loss gradients → codes in raw units."""
        x = self._check_input(x)
        pre = self.pre_activation(x * self.input_scale)
        score = pre.relu() * (1 + self.beta * self.gradient_scores(grad))
        idx = score.topk(self.k, dim=-1).indices
        return torch.zeros_like(pre).scatter(-1, idx, pre.gather(-1, idx).relu()) / self.input_scale

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "topk", "k": self.k,
                "training_rule": {"activation": "gradient_topk", "k": self.k, "beta": self.beta,
                                  "note": "needs the LM-loss gradient; encode_with_gradient runs it"}}

    def hyperparams(self) -> dict[str, Any]:
        return {"k": self.k, "beta": self.beta}
