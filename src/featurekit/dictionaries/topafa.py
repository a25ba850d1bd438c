"""top-AFA SAE (Lee, Davies, Canby & Hockenmaier 2025, "Evaluating and Designing Sparse Autoencoders by
Approximating Quasi-Orthogonality", arXiv 2503.24277; official code SewoongLee/top-afa-sae,
`training/sae.py::TopAFASAE`, read at commit 2190aab).

If x − b_dec = Σ_j f_j d_j with unit, ε-quasi-orthogonal directions, then ‖f‖ ≈ ‖x − b_dec‖: the
input's norm is an "approximate feature activation" (AFA) that fixes the norm of the code, and so how
many latents each token gets. Per token (training and inference alike; code `TopAFASAE.forward`):

    a   = ReLU((x − b_dec) W_encᵀ)               no encoder bias (as the code; b_enc is a zero buffer)
    s_j = (a_j ‖d_j‖)²,  sorted descending;  c_t = √(Σ_{i ≤ t} s_(i))
    k*  = the smallest t minimising |c_t − ‖x − b_dec‖|        (`operators.top_afa_select`)
    f   = a on the k* largest, 0 elsewhere;      x̂ = f W_dec + b_dec

Loss: reconstruction + aux-k (trainer) + the norm-matching term
    L_AFA = λ_AFA · d · Σ_n (‖f_n‖ − ‖x_n − b_dec‖)² / Σ_n ‖x_n − x̄‖²
The code adds λ_AFA · mean_n (‖f_n‖ − ‖x_n‖)² to a per-element MSE; dividing that whole loss by the
batch's per-element variance gives the trainer's FVU plus the term above, so λ_AFA keeps the code's
meaning (sweep {1/128, 1/64, 1/32, 1/24, 1/16}; default 1/64). Two choices of ours: the target is
‖x − b_dec‖ (the same AFA the selection uses; the code compares to ‖x‖, which on per-token
layer-normed inputs with b_dec ≈ 0 is nearly the same, but on un-centred inputs makes ‖f‖ chase the
mean: FVU 0.68 at L0 5 vs 0.14 at L0 33 with ours, one synthetic run with an offset), and it is
detached (the term trains the codes' norm, not b_dec). Aux-k: the trainer's
normalised form (the code uses the BatchTopK repo's un-normalised MSE, k_aux = 512).

Training runs through the sparse kernels over the first max_n k*_n columns of each row's order when
that width is at most F/4, else densely; values and gradients are the same (tests/dictionaries/
test_topafa.py). Decoder rows unit-norm, tied initialisation as TopK. `token_k(x)` gives each
token's k*; L0 = mean k* (less where a selected code is 0, i.e. a token with no positive activation).

What to expect (measured on synthetic ground truth, tests/dictionaries/test_topafa.py): k* is
scale-free (it depends on the direction of x − b_dec, not its norm), and a dense code of d latents
(an orthonormal basis and its negative, F ≥ 2d) reconstructs exactly with ‖f‖ = ‖x − b_dec‖, so
the loss does not favour a sparser code; training settled at L0 ≈ d–2d (the paper's GPT-2 runs:
2–3 d) with a low FVU, per-token k* rising with the number of true features, and no
recovery of the features themselves (MMCS as at init), where TopK with a small k recovers them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FeaturekitError
from . import kernels
from .base import Dictionary, Output
from .operators import top_afa, top_afa_select
from .registry import register

#: the sparse kernels run when the widest row keeps at most this fraction of the latents
SPARSE_MAX_FRACTION = 0.25


@dataclass
class TopAFAParams:
    afa_coefficient: float = 1 / 64  #: λ_AFA of the norm-matching loss (‖f‖ ≈ ‖x − b_dec‖); the authors' code sweeps 1/128…1/16


@register(TopAFAParams)
class TopAFASAE(Dictionary):
    method = "topafa"
    uses_auxk = True

    def __init__(self, d_in: int, n_latents: int, afa_coefficient: float = 1 / 64, seed: int | None = None):
        super().__init__(d_in, n_latents)
        if afa_coefficient < 0:
            raise FeaturekitError(f"top-AFA afa_coefficient must be >= 0, got {afa_coefficient}")
        self.afa_coefficient = float(afa_coefficient)
        del self.b_enc  # the code has no encoder bias; a zero buffer keeps the shared machinery and the file uniform
        self.register_buffer("b_enc", torch.zeros(n_latents))
        self.init_tied(seed)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise FeaturekitError("top-AFA needs the input norm beside the pre-activations; use encode(x)")

    def _select(self, centered: torch.Tensor, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            return top_afa_select(pre, centered.norm(dim=-1), self.W_dec.norm(dim=1))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check_input(x)
        centered = x * self.input_scale - self.b_dec
        pre = centered @ self.W_enc.T + self.b_enc
        return top_afa(pre, centered.norm(dim=-1), self.W_dec.norm(dim=1)) / self.input_scale

    @torch.no_grad()
    def token_k(self, x: torch.Tensor) -> torch.Tensor:
        """k* per token for raw activations x (..., d): how many latents top-AFA selects."""
        x = self._check_input(x)
        centered = x * self.input_scale - self.b_dec
        return self._select(centered, centered @ self.W_enc.T + self.b_enc)[2]

    def forward(self, x: torch.Tensor) -> Output:
        """Training forward (x in the training scale) with the AFA loss; sparse kernels when k* is small."""
        x = self._check_input(x)
        centered = x - self.b_dec
        target = centered.detach().norm(dim=-1)
        with torch.no_grad():
            pre = centered @ self.W_enc.T + self.b_enc
        idx, keep, _ = self._select(centered, pre)  # each token's first k* latents
        if idx.shape[-1] <= SPARSE_MAX_FRACTION * self.n_latents:
            x_hat, fast = kernels.sparse_forward(x, self.encoder, kernels.Picked(idx, keep, pre=pre), self.W_dec, act=torch.relu)
            out = self.output(x, x_hat + self.b_dec, pre=pre, fast=fast)
            norm = fast.values.norm(dim=-1)
        else:
            pre = centered @ self.W_enc.T + self.b_enc  # with its graph
            mask = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, idx, keep)
            codes = pre.relu() * mask
            out = self.output(x, codes @ self.W_dec + self.b_dec, codes=codes, pre=pre)
            norm = codes.norm(dim=-1)
        out.losses["afa"] = self.afa_loss(x, norm, target)
        return out

    def afa_loss(self, x: torch.Tensor, code_norm: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """λ_AFA · d · Σ (‖f‖ − ‖x − b_dec‖)² / Σ ‖x − x̄‖² (see the module docstring)."""
        variance = (x.detach().float() - x.detach().float().mean(0)).pow(2).sum().clamp_min(1e-12)
        return self.afa_coefficient * self.d_in * (code_norm.float() - target.float()).pow(2).sum() / variance

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "top_afa", "pre": "relu((x*c - b_dec) W_enc^T)", "target": "norm(x*c - b_dec)",
                "scores": "(a_j * norm(W_dec_j))^2", "k": "first argmin_t |sqrt(cumsum(sorted scores))_t - target| + 1"}

    def hyperparams(self) -> dict[str, Any]:
        return {"afa_coefficient": self.afa_coefficient}
