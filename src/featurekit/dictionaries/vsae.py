"""Variational TopK SAE, vSAE (Baker & Li 2025, "Analysis of Variational Sparse Autoencoders",
arXiv 2509.22994; authors' code ZachData/SPAR-Variational-Sparse-Autoencoders,
`dictionary_learning/trainers/vsae_topk.py`, `VSAETopK` and `VSAETopKTrainer`, read at commit ad03f7a).

The encoder gives each latent a Gaussian posterior q(z|x) = N(μ, σ²); training decodes a sample,
inference the mean:

    μ      = ReLU(x W_encᵀ + b_enc)                   (code: "April-update mode", no b_dec subtraction)
    log σ² = clamp(x W_varᵀ + b_var, −6, 2)           (b_var starts at −2; learned_variance=False: σ = 1)
    z      = μ + σ ⊙ ε, ε ~ N(0, I)   in training (torch's global RNG);   z = μ at inference
    f      = z on the k entries of largest |z| (sign kept), 0 elsewhere;   x̂ = f W_dec + b_dec
    L      = Σ_d (x − x̂)² (mean over tokens) + β · w(t) · KL + α · aux-k
    KL     = ½ Σ_j (μ_j² + σ_j² − 1 − log σ_j²)       over all F latents, mean over tokens

At inference z = μ ≥ 0, so the rule is plain TopK of the pre-activations (`operators.topk`).
β (`kl_coefficient`) depends on the input scale (featurekit trains on inputs of mean norm √d); the
code's defaults are β = 500 with learned variance and β = 1 in its Pythia runs (fixed variance).
Our default β = 0.01 is the largest we measured to still learn on synthetic data (β ≥ 0.1 collapsed
the posterior there: μ = 0 for every latent). Even a small β pulls σ towards 1 (mean σ² after 500
synthetic steps: 0.013 at β = 0, 0.44 at β = 0.001, 0.85 at β = 0.01), and the noise of unselected
latents then competes in the TopK — the dead latents the paper reports (tests/dictionaries/test_vsae.py
measures them against TopK).
w(t) is the trainer's linear ramp (`sparsity_scale`, over train.sparsity_warmup_fraction; the code
ramps over 10% of the steps). Aux-k ranks dead latents by |z| and keeps the sign (as the code, and
as the trainer's signed aux-k); "fired" means a non-zero code. Decoder rows are free, as in the code
(no unit-norm constraint); initialisation as the code: W_enc = W_dec with rows of norm 0.1, biases 0,
W_var Kaiming-uniform (a = 0.01).
Choices of ours: the code clamps μ to ±10 inside the KL, a scale-dependent guard we drop; with
learned_variance=False we sample with σ = 1 (the paper's description: "variance is always set to 1"),
where the code's fixed-variance mode does not sample at all and penalises ½‖z‖². The variance head
and the N(0, I) prior live in the training scale: `fold_input_scale` folds what inference uses, so
continue training only an unfolded dictionary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import FeaturekitError
from . import kernels
from .base import Dictionary, Output
from .operators import topk
from .registry import check_k, register

LOGVAR_MIN, LOGVAR_MAX, LOGVAR_INIT = -6.0, 2.0, -2.0


@dataclass
class VSAEParams:
    k: int = 32  #: latents kept per token (TopK over the sampled codes' means)
    kl_coefficient: float = 0.01  #: β of the KL term to N(0, I) (training scale, ramped; ≥ 0.1 collapsed on synthetic data)
    learned_variance: bool = True  #: the encoder learns log σ² (false: σ = 1)

    def check(self, n_latents: int) -> None:
        check_k(self.k, n_latents)


@register(VSAEParams)
class VariationalSAE(Dictionary):
    method = "vsae"
    unit_norm_decoder = False
    recon_loss = "squared_error"
    uses_auxk = True
    signed = True  # training codes are samples and may be negative

    def __init__(self, d_in: int, n_latents: int, k: int = 32, kl_coefficient: float = 0.01, learned_variance: bool = True,
                 seed: int | None = None):
        super().__init__(d_in, n_latents)
        if not 0 < k <= n_latents:
            raise FeaturekitError(f"k must be in [1, n_latents={n_latents}], got {k}")
        if kl_coefficient < 0:
            raise FeaturekitError(f"vSAE kl_coefficient must be >= 0, got {kl_coefficient}")
        self.k, self.kl_coefficient, self.learned_variance = k, float(kl_coefficient), bool(learned_variance)
        #: multiplies β; the trainer ramps it from 0 to 1 (the KL warm-up; a training-time schedule, not saved).
        self.sparsity_scale = 1.0
        self.init_tied(seed, row_norm=0.1)
        if self.learned_variance:
            self.W_var = nn.Parameter(torch.empty(n_latents, d_in))
            self.b_var = nn.Parameter(torch.full((n_latents,), LOGVAR_INIT))
            gen = torch.Generator().manual_seed(seed + 1) if seed is not None else None
            nn.init.kaiming_uniform_(self.W_var, a=0.01, generator=gen)

    def pre_activation(self, x_scaled: torch.Tensor) -> torch.Tensor:
        return x_scaled @ self.W_enc.T + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Inference: z = μ = ReLU(π) and TopK by |μ| = μ, i.e. TopK of π."""
        return topk(pre, self.k)

    def log_variance(self, x: torch.Tensor) -> torch.Tensor:
        """log σ² (training scale), clamped to [−6, 2]; 0 (σ = 1) without a learned variance."""
        if not self.learned_variance:
            return torch.zeros(*x.shape[:-1], self.n_latents, dtype=x.dtype, device=x.device)
        return (x @ self.W_var.T + self.b_var).clamp(LOGVAR_MIN, LOGVAR_MAX)

    def forward(self, x: torch.Tensor) -> Output:
        """x in the training scale. In train() mode z is a sample (torch's global RNG), in eval() mode z = μ."""
        x = self._check_input(x)
        mu = self.pre_activation(x).relu()
        log_var = self.log_variance(x)
        z = mu + (0.5 * log_var).exp() * torch.randn_like(mu) if self.training else mu
        with torch.no_grad():
            idx = z.abs().topk(self.k, dim=-1, sorted=False).indices
        values = z.gather(-1, idx)
        x_hat = kernels.sparse_decode(idx, values, self.W_dec) + self.b_dec
        out = self.output(x, x_hat, pre=z, fast=kernels.FastCodes(self.n_latents, idx=idx, values=values))
        kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(-1).mean()
        out.losses["kl"] = self.kl_coefficient * self.sparsity_scale * kl
        return out

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "topk", "k": self.k, "pre": "x*c W_enc^T + b_enc (no b_dec subtraction)",
                "training_rule": {"activation": "abs_topk", "of": "mu + sigma*eps", "kl_coefficient": self.kl_coefficient,
                                  "learned_variance": self.learned_variance}}

    def hyperparams(self) -> dict[str, Any]:
        return {"k": self.k, "kl_coefficient": self.kl_coefficient, "learned_variance": self.learned_variance}
