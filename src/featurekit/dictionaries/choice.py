"""Feature Choice and Mutual Choice SAEs (Kola Ayonrinde 2024, "Adaptive Sparse Allocation with
Mutual Choice & Feature Choice Sparse Autoencoders", arXiv 2411.02124; no code was released).

Sparsity as an allocation of a budget of M = B·k token–feature matches over a batch of B tokens,
with affinities P = ReLU(π), π = (x − b_dec) W_encᵀ + b_enc, and x̂ = (S ⊙ P) W_dec + b_dec:

    TopK (token choice):  each token keeps its k largest affinities
    Feature Choice (FC):  each latent keeps its m = k·B/F largest tokens  (`operators.feature_choice`)
    Mutual Choice (MC):   the B·k largest affinities of the batch          (`operators.mutual_choice`
                          = `batch_topk`: MC is BatchTopK, found concurrently)

Both let the number of latents per token vary (adaptive computation); the batch mean is k. The
operators follow from the paper's abstract (its definitions of the constraints); the rest is
recorded as ours because the paper's method sections could not be read:
* FC capacity: one uniform m = k·B/F per batch (the paper sets per-feature capacities from a Zipf
  fit, per its reviewers; not done here). A fractional m spends exactly round(k·B) slots: each latent
  takes ⌊m⌋ tokens, the latents with the strongest next candidate one more.
* Inference (batch-independent, per token): FC → a per-latent threshold vector θ_j, an EMA (factor
  `threshold_decay`, started at the first value) of the smallest activation latent j kept in a
  training batch, f_j = ReLU(π_j)·1[π_j > θ_j]; MC → the global BatchTopK threshold θ.
  A latent that never kept a token keeps θ_j = 0.
* Initialisation, unit-norm decoder, batch-FVU loss and aux-k as for TopK (FC has no dead latents
  while training by construction — each latent fires m times per batch when its column has m
  positive affinities — so aux-k rarely acts). `aux_zipf_loss` (train.aux_zipf_coef) can be added
  to either.
"""

from __future__ import annotations

from typing import Any

import torch

from . import kernels
from .base import Output
from .batchtopk import BatchTopKParams, BatchTopKSAE
from .operators import feature_choice_mask, threshold
from .registry import register
from .topk import TopKSAE


@register(BatchTopKParams)
class FeatureChoiceSAE(TopKSAE):
    method = "featurechoice"

    def __init__(self, d_in: int, n_latents: int, k: int = 32, threshold_decay: float = 0.99, seed: int | None = None):
        super().__init__(d_in, n_latents, k=k, seed=seed)
        self.threshold_decay = float(threshold_decay)
        self.register_buffer("theta", torch.zeros(n_latents))
        self.register_buffer("theta_updates", torch.zeros(n_latents, dtype=torch.long))

    def capacity(self, n_tokens: int) -> float:
        """m = k·B/F tokens per latent for a batch of B tokens (mean L0 = k)."""
        return self.k * n_tokens / self.n_latents

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """The per-token inference rule (used by `encode`): per-latent thresholds."""
        return threshold(pre, self.theta)

    def forward(self, x: torch.Tensor) -> Output:
        """Training forward: feature choice over the batch. Through the sparse kernels, padded to the
        largest number of latents any token got, when that is at most min(8k, F/2) (it bounds the
        kernels' temporaries; FC rows vary, ~4.5k at most on our synthetic data); densely otherwise.
        Same values and gradients either way (tests/dictionaries/test_choice.py)."""
        x = self._check_input(x)
        with torch.no_grad():
            pre = self.encoder.pre(x)  # π
            mask = feature_choice_mask(pre.relu(), self.capacity(x.shape[0]))  # each latent's m best tokens
            width = int(mask.sum(-1).max()) if mask.numel() else 0
        if 0 < width <= min(8 * self.k, self.n_latents // 2):
            idx = mask.to(pre.dtype).topk(width, dim=-1, sorted=False).indices  # every kept latent of the row, then padding
            return self.sparse_output(x, kernels.Picked(idx, keep=mask.gather(-1, idx), pre=pre))
        pre = self.pre_activation(x)
        codes = pre * mask
        return self.output(x, codes @ self.W_dec + self.b_dec, codes=codes, pre=pre)

    @torch.no_grad()
    def after_step(self, out: Output) -> None:
        """θ_j ← EMA of the smallest activation latent j kept in this batch (latents that kept none: unchanged)."""
        kept = out.codes > 0
        has = kept.any(dim=0)
        smallest = out.codes.masked_fill(~kept, float("inf")).min(dim=0).values
        first = has & (self.theta_updates == 0)
        later = has & (self.theta_updates > 0)
        self.theta[first] = smallest[first]
        self.theta[later] = self.threshold_decay * self.theta[later] + (1 - self.threshold_decay) * smallest[later]
        self.theta_updates[has] += 1

    @torch.no_grad()
    def calibrate(self, batches: list[torch.Tensor]) -> dict[str, Any] | None:
        """θ_j ← the mean over `batches` of latent j's ⌊m⌋-th largest activation in the batch (m = k·B/F), with the
        final weights (BatchTopK's post-training estimate, per latent); a latent that never fires keeps its θ_j."""
        total = torch.zeros_like(self.theta)
        count = torch.zeros_like(self.theta)
        for x in batches:
            scores = self.pre_activation(x.to(self.W_enc.dtype)).relu()
            m = max(1, min(int(self.capacity(len(x))), len(x)))
            cut = scores.topk(m, dim=0, sorted=False).values.min(dim=0).values
            total += cut
            count += (cut > 0).to(count.dtype)
        fired = count > 0
        if not fired.any():
            return None
        before = float(self.theta.mean())
        self.theta[fired] = total[fired] / count[fired]
        self.theta_updates[fired] += 1
        return {"rule": "theta_j = mean over batches of latent j's floor(k*B/F)-th largest activation, final weights",
                "batches": len(batches), "tokens": sum(len(x) for x in batches), "latents_set": int(fired.sum()),
                "theta_ema_mean": before, "theta_mean": float(self.theta.mean())}

    def _fold_thresholds(self, c: torch.Tensor) -> None:
        self.theta.div_(c)

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "threshold", "threshold": "per-latent buffer `theta`", "scope": "per_latent",
                "training_rule": {"activation": "feature_choice", "k": self.k, "m": "k·B/F tokens per latent in a batch of B"}}

    def hyperparams(self) -> dict[str, Any]:
        return {"k": self.k, "threshold_decay": self.threshold_decay}


@register(BatchTopKParams)
class MutualChoiceSAE(BatchTopKSAE):
    """Mutual Choice: the B·k largest affinities of the batch (`operators.mutual_choice`, which is
    `batch_topk`), trained and run exactly as BatchTopK (global inference threshold θ)."""

    method = "mutualchoice"

    def inference_rule(self) -> dict[str, Any]:
        return {**super().inference_rule(), "training_rule": {"activation": "mutual_choice", "k": self.k}}
