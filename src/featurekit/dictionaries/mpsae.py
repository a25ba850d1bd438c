"""MP-SAE: the encoder is k unrolled matching-pursuit steps over the decoder atoms (Costa, Fel, Lubana,
Tolooshams & Ba 2025, "From Flat to Hierarchical: Extracting Sparse Representations with Matching
Pursuit", arXiv 2506.03093; official code: KempnerInstitute/overcomplete `overcomplete/sae/mp_sae.py`).

With unit-norm atoms d_j (the rows of W_dec), per token:

    r⁰ = x − b_dec,  z = 0
    for t = 1..k:   c = r^{t−1} W_decᵀ;   j_t = argmax_j c_j;   z_{j_t} += c_{j_t};   r^t = r^{t−1} − c_{j_t} d_{j_t}
    x̂ = z W_dec + b_dec    (= x − r^k)

* Selection is the argmax of the *signed* correlation, no |·| and no ReLU (overcomplete: `torch.max(z)`).
  A code is negative only when every atom anti-correlates with the residual, which with F ≫ d atoms
  essentially never happens, but it can, so `signed = True`: "fired" means z ≠ 0, and L0 counts
  non-zeros. Each step makes r orthogonal to the chosen atom, so ‖r^t‖² = ‖r^{t−1}‖² − c_{j_t}²: the
  residual norm never increases, and an atom is re-chosen only after others have been (L0 ≤ k).
* Gradients flow through all k unrolled steps (the correlations c_{j_t} and the residual updates);
  the selections are piecewise constant, as in the official code. Our implementation gives the same
  values and gradients as that dense loop but cheaper: each step's (B, d)×(d, F) correlation matmul
  runs without a graph (it only picks j_t); the graph holds the gathered rows d_{j_t} (B, d) and
  c_{j_t} = ⟨r, d_{j_t}⟩, so backward costs O(B·k·d), no (B, F) or (B, k, F) tensor.
* b_dec (ours): subtracted before the pursuit and added back; trained by gradient, initialised by the
  trainer (geometric median). overcomplete's MpSAE has no bias; a pre-bias in the paper is recalled
  by our spec but was not verified against its text.
* No encoder weights. The `Dictionary` interface and the file keep `W_enc`/`b_enc`; here they are
  *buffers*, not parameters: W_enc mirrors W_dec (kept equal after every step and at construction,
  so a reader of the file sees the tied encoder matrix) and b_enc stays 0. Neither is trained.
* Decoder rows are unit-norm, which the residual update needs (trainer: gradient projection +
  renormalisation after each step). Initialisation: random unit rows (ours, as our other methods).
* Dead atoms: overcomplete's documentation (docs/saes/mp.md) recommends a "revive" term that pulls
  atoms unused in the batch towards the residual: L −= λ · mean_{n, j dead} ⟨r_n, d_j⟩. We use it with
  the residual detached and divided by its batch RMS norm, so the term is scale-free and moves only
  dead atoms (ours), applied whenever an atom is unused in the batch (the docs: more than 10 unused,
  codes below 1e-2). λ = `revive_coef` (default 0.01 as the docs; 0 disables). No aux-k. On our
  synthetic data it changes little: no dead atom with or without it, MMCS within ±0.008.
* Inference: batch-independent; the number of steps `k` can be changed after loading (`sae.k = 8`, or
  `sae.encode(x, k=8)`), and `residual_threshold` τ stops a token's pursuit once ‖r‖ ≤ τ·‖x − b_dec‖
  (adaptive L0 per token; k is then the cap). Both are recorded in the file's inference rule.
  Training uses the same `k` and `residual_threshold`.
* Folding the input scale c is exact: the pursuit is positively homogeneous (same selections, codes ×1/c).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FeaturekitError
from . import kernels
from .base import Dictionary, Output
from .registry import check_k, register


@dataclass
class MPSAEParams:
    k: int = 32  #: matching-pursuit steps per token
    residual_threshold: float | None = None  #: stop a token once ‖r‖ ≤ this × ‖x − b_dec‖; null runs all k steps
    revive_coef: float = 0.01  #: λ of the revive term pulling atoms unused in the batch towards the residual; 0 = off

    def check(self, n_latents: int) -> None:
        check_k(self.k, n_latents)


@register(MPSAEParams)
class MPSAE(Dictionary):
    method = "mpsae"
    signed = True
    uses_auxk = False

    def __init__(self, d_in: int, n_latents: int, k: int = 32, residual_threshold: float | None = None,
                 revive_coef: float = 0.01, seed: int | None = None):
        super().__init__(d_in, n_latents)
        # No encoder: W_enc (= W_dec, for readers of the file) and b_enc (= 0) are buffers, never trained.
        del self.W_enc, self.b_enc
        self.register_buffer("W_enc", torch.empty(n_latents, d_in))
        self.register_buffer("b_enc", torch.zeros(n_latents))
        self.k = k
        self.residual_threshold = residual_threshold
        self.revive_coef = float(revive_coef)
        self.init_tied(seed)

    # -- settable inference knobs (validated) --------------------------------------------------
    @property
    def k(self) -> int:
        return self._k

    @k.setter
    def k(self, value: int) -> None:
        if not isinstance(value, int) or value < 1:
            raise FeaturekitError(f"MP-SAE k (pursuit steps) must be a positive integer, got {value!r}")
        self._k = value

    @property
    def residual_threshold(self) -> float | None:
        return self._residual_threshold

    @residual_threshold.setter
    def residual_threshold(self, value: float | None) -> None:
        if value is not None and not 0.0 <= float(value) < 1.0:
            raise FeaturekitError(f"MP-SAE residual_threshold must lie in [0, 1) or be None, got {value!r}")
        self._residual_threshold = None if value is None else float(value)

    # -- the pursuit ------------------------------------------------------------------------------
    def pursuit(self, r: torch.Tensor, k: int, residual_threshold: float | None = None):
        """Matching pursuit on centred inputs r (B, d): returns (idx (B, t), values (B, t), residual (B, d)), t ≤ k.

        Tokens whose residual norm has fallen to `residual_threshold`·‖r⁰‖ stop (their later values are 0).
        """
        W = self.W_dec
        stop = None if residual_threshold is None else residual_threshold * r.detach().norm(dim=-1)
        idx, values = [], []
        for _ in range(k):
            live = None
            with torch.no_grad():
                rd = r.detach()
                if stop is not None:
                    live = rd.norm(dim=-1) > stop
                    if not live.any():
                        break
                j = (rd @ W.detach().T).argmax(dim=-1)
            atoms = W[j]  # (B, d) rows, with their graph
            v = (r * atoms).sum(-1)
            if live is not None:
                v = v * live
            r = r - v[:, None] * atoms
            idx.append(j)
            values.append(v)
        if not idx:
            empty = r.new_zeros(r.shape[0], 0)
            return empty.long(), empty, r
        return torch.stack(idx, 1), torch.stack(values, 1), r

    def _codes(self, idx: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Dense (B, F) codes; an atom chosen twice gets the sum of its values."""
        return torch.zeros(idx.shape[0], self.n_latents, dtype=values.dtype, device=values.device).scatter_add_(-1, idx, values)

    def encode(self, x: torch.Tensor, k: int | None = None, residual_threshold: float | None = None) -> torch.Tensor:
        """Raw activations (..., d) → codes (..., F) in raw units. `k` / `residual_threshold` override the
        stored inference rule for this call (None keeps `self.k` / `self.residual_threshold`)."""
        x = self._check_input(x)
        if k is not None and (not isinstance(k, int) or k < 1):
            raise FeaturekitError(f"MP-SAE k (pursuit steps) must be a positive integer, got {k!r}")
        tau = self.residual_threshold if residual_threshold is None else float(residual_threshold)
        shape = x.shape
        r = x.reshape(-1, self.d_in) * self.input_scale - self.b_dec
        idx, values, _ = self.pursuit(r, self.k if k is None else k, tau)
        return (self._codes(idx, values) / self.input_scale).reshape(*shape[:-1], self.n_latents)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise FeaturekitError("MP-SAE has no pointwise activation: its codes come from the pursuit; use encode(x)")

    def forward(self, x: torch.Tensor) -> Output:
        """Training forward (x already scaled by c): codes from the pursuit, x̂ = Σ values·d + b_dec.
        `pre` holds the first step's correlations (x − b_dec) W_decᵀ, without graph."""
        x = self._check_input(x)
        r0 = x - self.b_dec
        idx, values, residual = self.pursuit(r0, self.k, self.residual_threshold)
        x_hat = kernels.sparse_decode(idx, values, self.W_dec) + self.b_dec
        with torch.no_grad():
            pre = r0 @ self.W_dec.T
        out = Output(x_hat=x_hat, codes=self._codes(idx, values.detach()), pre=pre)
        if self.revive_coef > 0:
            out.losses["revive"] = self._revive(idx, values, residual)
        return out

    def _revive(self, idx: torch.Tensor, values: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """−λ · mean over tokens n and atoms j unused in the batch of ⟨r_n / rms(r), d_j⟩ (r detached)."""
        used = torch.zeros(self.n_latents, dtype=torch.bool, device=idx.device)
        used[idx[values.detach() != 0]] = True
        if used.all():
            return residual.new_zeros(())
        r = residual.detach()
        mean_r = r.mean(0) / r.pow(2).sum(-1).mean().sqrt().clamp_min(1e-12)
        return -self.revive_coef * (self.W_dec[~used].mean(0) @ mean_r)

    @torch.no_grad()
    def after_step(self, out: Output) -> None:
        self.W_enc.copy_(self.W_dec)

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "matching_pursuit", "k": self.k, "residual_threshold": self.residual_threshold,
                "selection": "argmax of the signed correlation ⟨r, d_j⟩ with unit-norm W_dec rows; r⁰ = x·c − b_dec",
                "signed": True}

    def hyperparams(self) -> dict[str, Any]:
        return {"k": self.k, "residual_threshold": self.residual_threshold, "revive_coef": self.revive_coef}
