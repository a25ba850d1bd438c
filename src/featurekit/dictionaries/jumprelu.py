"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv 2407.14435). No official code;
formulas follow research/seed-methods-sae.md §3, which matches the SAELens, dictionary_learning
and BatchTopK-repo implementations:

    π = x W_encᵀ + b_enc                 (no b_dec subtraction, as dictionary_learning)
    f = π · H(π − θ),  θ ∈ R^F learned   x̂ = f W_dec + b_dec
    L = Σ_d (x − x̂)² (mean over tokens) + λ · mean over tokens of Σ_j H(π_j − θ_j)

Pseudo-derivatives with the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth ε:
    ∂f_j/∂θ_j := −(θ_j/ε) K((π_j − θ_j)/ε),   ∂f_j/∂π_j = H(π_j − θ_j)
    ∂H_j/∂θ_j := −(1/ε) K((π_j − θ_j)/ε),     ∂H_j/∂π_j := 0   (the L0 term trains only θ)
θ is a raw parameter (dictionary_learning: log-θ trained poorly), clamped at ≥ 0 after each step.

Scale: the paper's ε = θ_init = 0.001 are for inputs of unit mean squared norm. featurekit trains on
inputs of mean norm √d, where pre-activations are √d times larger, so the defaults here are
0.001·√576 ≈ 0.025 for ε and θ_init. λ sets the sparsity and has to be swept for a target L0; it
is ramped up linearly by the trainer (`train.sparsity_warmup_fraction`). Decoder rows unit-norm.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Dictionary, Output
from .operators import jumprelu


def _kernel(pre: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    return (((pre - theta) / eps).abs() < 0.5).to(pre.dtype)


class _JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre * (pre > theta)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        grad_theta = (-(theta / ctx.eps) * _kernel(pre, theta, ctx.eps) * grad).sum(0)
        return grad * (pre > theta), grad_theta, None


class _StepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre, theta, eps):
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, theta = ctx.saved_tensors
        return torch.zeros_like(pre), (-(1.0 / ctx.eps) * _kernel(pre, theta, ctx.eps) * grad).sum(0), None


class JumpReLUSAE(Dictionary):
    method = "jumprelu"
    recon_loss = "squared_error"

    def __init__(self, d_in: int, n_latents: int, l0_coefficient: float = 1.0, bandwidth: float = 0.025,
                 threshold_init: float = 0.025, seed: int | None = None):
        super().__init__(d_in, n_latents)
        self.l0_coefficient, self.bandwidth, self.threshold_init = float(l0_coefficient), float(bandwidth), float(threshold_init)
        #: multiplies λ; the trainer ramps it from 0 to 1 (a training-time schedule, not saved).
        self.sparsity_scale = 1.0
        self.theta = torch.nn.Parameter(torch.full((n_latents,), self.threshold_init))
        self.init_tied(seed)

    def pre_activation(self, x_scaled: torch.Tensor) -> torch.Tensor:
        return x_scaled @ self.W_enc.T + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return jumprelu(pre, self.theta)

    def forward(self, x: torch.Tensor) -> Output:
        """Training forward with the straight-through estimators."""
        x = self._check_input(x)
        pre = self.pre_activation(x)
        codes = _JumpReLUFn.apply(pre, self.theta, self.bandwidth)
        out = Output(x_hat=codes @ self.W_dec + self.b_dec, codes=codes, pre=pre)
        l0 = _StepFn.apply(pre, self.theta, self.bandwidth).sum(-1).mean()
        out.losses["l0"] = self.l0_coefficient * self.sparsity_scale * l0
        return out

    @torch.no_grad()
    def after_step(self, out: Output) -> None:
        self.theta.clamp_(min=0.0)

    def _fold_thresholds(self, c: torch.Tensor) -> None:
        self.theta.div_(c)

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "jumprelu", "threshold": "per-latent parameter `theta`"}

    def hyperparams(self) -> dict[str, Any]:
        return {"l0_coefficient": self.l0_coefficient, "bandwidth": self.bandwidth, "threshold_init": self.threshold_init}
