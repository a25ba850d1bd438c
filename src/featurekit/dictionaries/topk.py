"""TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders"; OpenAI code
`sparse_autoencoder/model.py`).

    π = (x − b_dec) W_encᵀ + b_enc,   f = ReLU(TopK_k(π)),   x̂ = f W_dec + b_dec

Decoder rows are kept at unit norm during training. Initialisation: W_dec rows unit-norm random,
W_enc = W_dec (i.e. the encoder matrix is the decoder transposed), b_enc = 0, b_dec from the data
(geometric median, set by the trainer). Dead latents are revived by the aux-k loss
(`featurekit.train.losses.auxk_loss`), which the trainer adds for methods that ask for it.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import FeaturekitError
from .base import Dictionary, Output
from .operators import abs_topk, topk
from .sparse import densify, gather_linear, sparse_decode


class TopKSAE(Dictionary):
    method = "topk"
    uses_auxk = True

    def __init__(self, d_in: int, n_latents: int, k: int = 32, seed: int | None = None):
        super().__init__(d_in, n_latents)
        if not 0 < k <= n_latents:
            raise FeaturekitError(f"k must be in [1, n_latents={n_latents}], got {k}")
        self.k = k
        self.init_tied(seed)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return topk(pre, self.k)

    def forward(self, x: torch.Tensor) -> Output:
        """Training forward with sparse kernels (same values and gradients as the dense formula)."""
        x = self._check_input(x)
        centered = x - self.b_dec
        with torch.no_grad():
            pre = centered @ self.W_enc.T + self.b_enc
            idx = (pre.abs() if self.signed else pre).topk(self.k, dim=-1, sorted=False).indices
        values = gather_linear(centered, self.W_enc, self.b_enc, idx, pre)
        values = values if self.signed else values.relu()
        x_hat = sparse_decode(idx, values, self.W_dec) + self.b_dec
        out = Output(x_hat=x_hat, codes=densify(idx, values, self.n_latents), pre=pre)
        out.losses.update(self.extra_losses(x, out))
        return out

    def pre_at(self, x: torch.Tensor, idx: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        return gather_linear(x - self.b_dec, self.W_enc, self.b_enc, idx, pre)

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "topk", "k": self.k}

    def hyperparams(self) -> dict[str, Any]:
        return {"k": self.k}


class AbsTopKSAE(TopKSAE):
    """AbsTopK (Zhu, Khalili & Zhu 2025, "Rethinking Sparse Autoencoders for Bidirectional Features",
    arXiv 2510.00404): the k largest-magnitude pre-activations keep their sign, so one latent can
    represent a feature used in both directions. Otherwise as TopK (init, unit-norm decoder, sparse
    kernels); aux-k ranks dead latents by |π| and keeps signs (our choice; the paper has no aux loss).
    Sign gauge: (f_j, d_j) and (−f_j, −d_j) are equivalent — compare features up to sign."""

    method = "abstopk"
    signed = True

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return abs_topk(pre, self.k)

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "abs_topk", "k": self.k, "signed": True}
