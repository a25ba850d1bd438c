"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead", arXiv 2407.14435). The paper has no
official code; formulas follow the paper (§3–§4), and the reference implementations SAELens `saes/jumprelu_sae.py` and dictionary_learning
`trainers/jumprelu.py` (read, not copied):

    π = (x − b_dec) W_encᵀ + b_enc        (encoder input centred on b_dec: see "changes" below)
    f = π · H(π − θ),  θ ∈ R^F learned     x̂ = f W_dec + b_dec,  decoder rows unit-norm
    L = Σ_d (x − x̂)² (mean over tokens) + λ · mean over tokens of Σ_j H(π_j − θ_j)       (paper eq. for L0)

Pseudo-derivatives with the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth ε (paper §4; the
same in SAELens and dictionary_learning):
    ∂f_j/∂θ_j := −(θ_j/ε) K((π_j − θ_j)/ε),   ∂f_j/∂π_j = H(π_j − θ_j)
    ∂H_j/∂θ_j := −(1/ε) K((π_j − θ_j)/ε),     ∂H_j/∂π_j := 0   (the L0 term trains only θ)
θ is a raw parameter (dictionary_learning: log-θ trained poorly), clamped at ≥ 0 after each step.
Decoder rows are kept at unit norm (the trainer's projection + renormalisation), as dictionary_learning.
W_enc = W_decᵀ at init (random unit directions), as both references. λ is ramped up linearly by
the trainer (`train.sparsity_warmup_fraction`; the paper warms λ up too).

Changes from the paper's recipe, and why. Measured on tests/train/synthetic.py data (48 true
features in d = 24, a mean offset carrying 94 % of the input norm, 96 latents, 500 steps × 256
tokens, lr 3e-3, the test's setup), MMCS true→learned over live latents at λ = 0.2 / 1: the code
before these changes 0.62 / 0.64 (FVU 0.41 / 0.57); each change below removed alone 0.69 / 0.72
(1), 0.84 / 0.90 (2), 0.92 / 0.96 (3); all three 0.96 / 0.97 (FVU 0.13 / 0.21).

1. The encoder input is centred on b_dec, π = (x − b_dec) W_encᵀ + b_enc (the paper, from secondary
   notes, and dictionary_learning use W_enc x + b_enc; SAELens's default
   `apply_b_dec_to_input=True` centres, as every other featurekit method). On data with a large
   mean (LLM residual streams carry one) the uncentred π_j is dominated by ⟨e_j, mean⟩: at init half
   the latents fire on every token with π far above θ, where the kernel is zero, so neither the L0
   term nor the threshold estimator reaches them, and the other half never fire; every encoder
   update also moves ⟨e_j, mean⟩ and with it every π_j. A reparametrisation of b_enc, not a new model.
2. b_enc is initialised from data so that each latent fires on a share `init_firing_rate` of the
   trainer's init sample (b_enc,j = θ_j − the (1 − r) quantile of π_j): the b_enc init of Anthropic's
   January-2025 update (transformer-circuits.pub/2025/january-update; they target 10 000 active latents
   of their width). The paper's b_enc = 0 with a tiny θ starts every centred latent firing on about
   half the tokens (L0 ≈ F/2), and the L0 term must then lift θ through the bulk of π's distribution
   with a kernel gradient that only a few tokens per batch feed, while the dictionary trains on dense
   codes and blends features. Rates 0.01–0.1 measured alike (MMCS 0.96–0.98 at λ = 0.2).
   `init_firing_rate=None` keeps the paper's b_enc = 0.
3. ε = θ_init = 0.1 in the training scale (E‖x‖ = √d, our normalisation). The paper's 0.001 is for
   E‖x‖² = 1 (N2), i.e. 0.001·√d here (0.024 at d = 576, 0.005 at d = 24). With 1 and 2 in place,
   ε from 0.03 to 0.3 measured alike; ε = θ_init = 0.005 weakens λ's hold on L0 at small batches
   (λ = 1: L0 1.9 instead of 1.25; few tokens fall in the kernel window), and θ_init ≥ 0.3 (a large
   jump at init) hurts (θ_init = 1: MMCS 0.66). ε trades bias for variance (paper §4): widen it for
   small batches.

λ is in units of Σ_d squared error in the training scale: a latent fires where it removes more than
λ of it. On the test data λ = 0.1 / 0.2 / 1 give L0 2.8 / 1.9 / 1.25 (true mean L0 2.4). Small λ
converges slowest (λ = 0.05: L0 4.9 after 500 steps, 2.5 after 2000). Kept from the paper after
testing alternatives: no pseudo-derivative of the L0 term to π (letting it reach W_enc and b_enc, as
Anthropic's variant does, switched latents off: λ = 0.2 half of them dead, λ = 1 L0 fell to 0); Adam
β₁ = 0.9 (the paper's β₁ = 0 measured the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FeaturekitError
from . import kernels
from .base import Dictionary, Output
from .kernels import JumpReLUFn, StepFn
from .operators import jumprelu
from .registry import register

#: latents per chunk in the data-dependent b_enc init (bounds the sample × chunk pre-activation block)
_INIT_CHUNK = 1024


@dataclass
class JumpReLUParams:
    l0_coefficient: float = 1.0  #: λ of the L0 penalty (sweep it for a target L0)
    #: ε of the straight-through estimator (training scale E‖x‖ = √d; the paper's 0.001 is at E‖x‖² = 1)
    bandwidth: float = 0.1
    threshold_init: float = 0.1  #: initial θ (training scale)
    init_firing_rate: float | None = 0.1  #: b_enc init so each latent fires on this share of the init sample; null → b_enc = 0

    def check(self, n_latents: int) -> None:
        if self.bandwidth <= 0 or self.threshold_init < 0 or self.l0_coefficient < 0:
            raise FeaturekitError(f"JumpReLU needs dictionary.bandwidth > 0, threshold_init ≥ 0 and l0_coefficient ≥ 0, got "
                                  f"{self.bandwidth}, {self.threshold_init}, {self.l0_coefficient}")
        if self.init_firing_rate is not None and not 0 < self.init_firing_rate < 1:
            raise FeaturekitError(f"dictionary.init_firing_rate must lie in (0, 1) or be null, got {self.init_firing_rate}")


@register(JumpReLUParams)
class JumpReLUSAE(Dictionary):
    method = "jumprelu"
    recon_loss = "squared_error"

    def __init__(self, d_in: int, n_latents: int, l0_coefficient: float = 1.0, bandwidth: float = 0.1,
                 threshold_init: float = 0.1, init_firing_rate: float | None = 0.1, seed: int | None = None):
        super().__init__(d_in, n_latents)
        if bandwidth <= 0 or threshold_init < 0:
            raise FeaturekitError(f"JumpReLU needs bandwidth > 0 and threshold_init ≥ 0, got {bandwidth}, {threshold_init}")
        if init_firing_rate is not None and not 0 < init_firing_rate < 1:
            raise FeaturekitError(f"init_firing_rate must lie in (0, 1) or be null (b_enc = 0), got {init_firing_rate}")
        self.l0_coefficient, self.bandwidth, self.threshold_init = float(l0_coefficient), float(bandwidth), float(threshold_init)
        self.init_firing_rate = None if init_firing_rate is None else float(init_firing_rate)
        #: multiplies λ; the trainer ramps it from 0 to 1 (a training-time schedule, not saved).
        self.sparsity_scale = 1.0
        self.theta = torch.nn.Parameter(torch.full((n_latents,), self.threshold_init))
        self.init_tied(seed)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return jumprelu(pre, self.theta)

    @torch.no_grad()
    def init_from_sample(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """b_enc,j = θ_j − q_j with q_j halfway between the round(r·n)-th and the next largest π_j of the
        n sample tokens (b_enc = 0 while computing it), so each latent starts firing on a share r of them."""
        n = x.shape[0]
        if self.init_firing_rate is None or n < 2:
            return
        above = min(max(round(self.init_firing_rate * n), 1), n - 1)
        centred = x.to(self.W_enc.device, self.W_enc.dtype) - self.b_dec
        for idx in torch.arange(self.n_latents, device=self.W_enc.device).split(_INIT_CHUNK):
            pre = centred @ self.W_enc[idx].T  # (n, chunk), b_enc = 0
            top = pre.topk(above + 1, dim=0).values[-2:]  # the above-th and (above + 1)-th largest π_j
            self.b_enc[idx] = self.theta[idx] - top.mean(0)  # the cut halfway between them: rounding cannot move a token across

    def forward(self, x: torch.Tensor) -> Output:
        """Training forward with the straight-through estimators: f = π·H(π − θ) (`JumpReLUFn`),
        x̂ = f W_dec + b_dec, L0 = mean over tokens of Σ_j H(π_j − θ_j) (`StepFn`). `kernels.jumprelu_forward`
        gives these formulas' values and gradients without their (N, F) graph (sparse kernels over the live
        pairs, or a fused dense path; tests/dictionaries/test_jumprelu.py); the formulas run as written inside
        `kernels.plain_kernels()`."""
        x = self._check_input(x)
        fast = kernels.jumprelu_forward(x, self.encoder, self.theta, self.bandwidth, self.W_dec)
        if fast is not None:
            x_hat, l0, pre, codes = fast
            out = Output(x_hat + self.b_dec, pre=pre, fast=codes)
        else:
            pre = self.pre_activation(x)
            codes = JumpReLUFn.apply(pre, self.theta, self.bandwidth)
            out = Output(codes @ self.W_dec + self.b_dec, codes=codes, pre=pre)
            l0 = StepFn.apply(pre, self.theta, self.bandwidth).sum(-1).mean()
        out.losses["l0"] = self.l0_coefficient * self.sparsity_scale * l0
        return out

    @torch.no_grad()
    def after_step(self, out: Output) -> None:
        self.theta.clamp_(min=0.0)

    def _fold_thresholds(self, c: torch.Tensor) -> None:
        self.theta.div_(c)

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "jumprelu", "pre_activation": "(x - b_dec) W_enc^T + b_enc",
                "threshold": "per-latent parameter `theta`"}

    def hyperparams(self) -> dict[str, Any]:
        return {"l0_coefficient": self.l0_coefficient, "bandwidth": self.bandwidth, "threshold_init": self.threshold_init,
                "init_firing_rate": self.init_firing_rate}
