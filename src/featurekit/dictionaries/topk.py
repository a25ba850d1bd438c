"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; OpenAI code
`sparse_autoencoder/model.py`).

    π = (x − b_dec) W_encᵀ + b_enc,   f = ReLU(TopK_k(π)),   x̂ = f W_dec + b_dec

Decoder rows are kept at unit norm during training. Initialisation: W_dec rows unit-norm random,
W_enc = W_dec (i.e. the encoder matrix is the decoder transposed), b_enc = 0, b_dec from the data
(geometric median, set by the trainer). Dead latents are revived by the aux-k loss
(`featurekit.train.losses.auxk_loss`), which the trainer adds for methods that ask for it.

`selection` swaps the per-token TopK_k for another per-token rule, same sparse kernels:

* "exact" (default): TopK_k as above.
* "statistical_gaussian": Spark's statistical top-k (You et al. 2025, `operators.statistical_topk`):
  f = ReLU(π)·1[π > mean(π) + c·std(π)], c = Φ⁻¹(1 − k/F) fixed — no sort; ≈ k latents only if
  the F pre-activations of a token look Gaussian.
* "statistical" (ours): the same rule with c calibrated for heavy tails: after every step c tracks
  (EMA, factor `threshold_decay`, first step copied) the batch's `calibrated_multiplier` — the c
  that keeps exactly k per token on average over the batch. The file records c.

The lazy-neuron Top-k (Li et al. 2023, TopK after the ReLU) selects what "exact" selects
(`operators.lazy_topk`, property-tested), so it needs no selection of its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FeaturekitError
from . import kernels
from .base import Dictionary, Output
from .operators import abs_topk, calibrated_multiplier, gaussian_multiplier, statistical_topk, topk
from .registry import check_decay, check_k, register

SELECTIONS = ("exact", "statistical", "statistical_gaussian")


@dataclass
class TopKParams:
    """TopK and AbsTopK."""

    k: int = 32  #: latents kept per token
    #: per-token rule: exact | statistical (Spark's mean + c·std, c calibrated to keep k) | statistical_gaussian (c fixed)
    selection: str = "exact"
    threshold_decay: float = 0.99  #: statistical selection: EMA factor of c

    def check(self, n_latents: int) -> None:
        check_k(self.k, n_latents)
        if self.selection not in SELECTIONS:
            raise FeaturekitError(f"dictionary.selection must be one of {list(SELECTIONS)}, got {self.selection!r}")
        check_decay(self.threshold_decay)


@register(TopKParams)
class TopKSAE(Dictionary):
    method = "topk"
    uses_auxk = True

    def __init__(self, d_in: int, n_latents: int, k: int = 32, selection: str = "exact", threshold_decay: float = 0.99,
                 seed: int | None = None):
        super().__init__(d_in, n_latents)
        if not 0 < k <= n_latents:
            raise FeaturekitError(f"k must be in [1, n_latents={n_latents}], got {k}")
        if selection not in SELECTIONS:
            raise FeaturekitError(f"selection must be one of {list(SELECTIONS)}, got {selection!r}")
        self.k, self.selection, self.threshold_decay = k, selection, float(threshold_decay)
        if selection != "exact":  # c of the statistical rule (a buffer: saved, restored, folded as is — it has no units)
            self.register_buffer("multiplier", torch.tensor(gaussian_multiplier(k, n_latents)))
            self.register_buffer("multiplier_updates", torch.zeros((), dtype=torch.long))
        self.init_tied(seed)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        if self.selection != "exact":
            return statistical_topk(pre, self.k, self.multiplier, signed=self.signed)
        return topk(pre, self.k)

    def forward(self, x: torch.Tensor) -> Output:
        """Training forward: the selection picks each token's latents from π, the sparse kernels give the
        dense formula's values and gradients (f = ReLU(π) at the picks, x̂ = f W_dec + b_dec)."""
        x = self._check_input(x)
        if self.selection == "exact":  # TopK_k(π); no (N, F) matrix outlives it (aux-k computes what it needs)
            picked = kernels.topk(x, self.encoder, self.k, self.signed)
        else:  # the statistical rule: a varying count per token, padded to the batch's largest count
            pre = self.encoder.pre(x)
            picked = kernels.from_mask(self.activation(pre) != 0, pre)
        return self.sparse_output(x, picked, act=None if self.signed else torch.relu)

    @torch.no_grad()
    def after_step(self, out: Output) -> None:
        """Statistical selection with calibration: c ← EMA of the batch's calibrated multiplier."""
        if self.selection != "statistical" or out.pre is None:
            return
        batch_c = calibrated_multiplier(out.pre.abs() if self.signed else out.pre, self.k)
        if int(self.multiplier_updates) == 0:
            self.multiplier.fill_(batch_c)
        else:
            self.multiplier.mul_(self.threshold_decay).add_((1 - self.threshold_decay) * batch_c)
        self.multiplier_updates += 1

    def inference_rule(self) -> dict[str, Any]:
        if self.selection != "exact":
            return {"activation": "statistical_topk", "k": self.k, "multiplier": float(self.multiplier), "signed": self.signed,
                    "rule": ("keep pre where |pre| > mean + multiplier*std of the token's |pre|" if self.signed else
                             "codes = relu(pre) where pre > mean + multiplier*std of the token's F pre-activations (population std)")}
        return {"activation": "topk", "k": self.k}

    def hyperparams(self) -> dict[str, Any]:
        if self.selection != "exact":
            return {"k": self.k, "selection": self.selection, "threshold_decay": self.threshold_decay}
        return {"k": self.k}


@register(TopKParams)
class AbsTopKSAE(TopKSAE):
    """AbsTopK (Zhu, Khalili & Zhu 2025, "Rethinking Sparse Autoencoders for Bidirectional Features",
    arXiv 2510.00404): the k largest-magnitude pre-activations keep their sign, so one latent can
    represent a feature used in both directions. Otherwise as TopK (init, unit-norm decoder, sparse
    kernels); aux-k ranks dead latents by |π| and keeps signs (our choice; the paper has no aux loss).
    Sign gauge: (f_j, d_j) and (−f_j, −d_j) are equivalent — compare features up to sign."""

    method = "abstopk"
    signed = True

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return abs_topk(pre, self.k) if self.selection == "exact" else super().activation(pre)

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "abs_topk", "k": self.k, "signed": True} if self.selection == "exact" else super().inference_rule()
