"""Transcoders and skip transcoders: a wide, sparsely active MLP trained to predict a layer's MLP
output from its MLP input (source site `mlp_in.L`, target `mlp_out.L`).

    π  = x W_encᵀ + b_enc                      x: the MLP input (no input centring; see init)
    f  = ReLU(TopK_k(π))                       codes; latent j reads W_enc[j] and writes W_dec[j]
    ŷ  = f W_dec + b_dec                       b_dec: the OUTPUT bias (width d_out)
    ŷ += x W_skipᵀ                             skip transcoder only (W_skip: d_out × d_in)

Loss: FVU of ŷ against y (the trainer compares `forward`'s x_hat with `target(x, y)`), plus aux-k
on the residual y − ŷ for dead latents.

Sources.
* Transcoders: Dunefsky, Chlenski & Nanda, "Transcoders Find Interpretable LLM Feature Circuits"
  (NeurIPS 2024, arXiv 2406.11944; code `jacobdunefsky/transcoder_circuits`,
  `sae_training/sparse_autoencoder.py`). The paper's transcoders are ReLU + L1 (the code's loss:
  MSE divided by ‖y‖ per token + λ‖f‖₁, ghost grads), with the input centred by a learned b_dec and
  a separate output bias b_dec_out, decoder rows normalised to unit norm at init (kept so during
  training, from secondary notes, not re-checked). That ReLU + L1 variant is not implemented here.
* This module follows the TopK transcoders of EleutherAI `sparsify` (`sparse_coder.py`, `trainer.py`),
  which Paulo, Shabalin & Belrose, "Transcoders Beat Sparse Autoencoders for Interpretability"
  (arXiv 2501.18823) train and extend with the skip connection: TopK selection (ReLU then top-k),
  no input centring, W_dec and W_skip initialised to ZERO, decoder norms free (no unit-norm
  projection or renormalisation for transcoders), b_enc = −mean(x)·W_encᵀ at the first batch
  (pre-activations centred; `init_from_sample`), loss FVU, aux-k on y − ŷ with k_aux = d_out/2.
  b_dec is the mean of y there; here the trainer sets it from y·c_out by `train.b_dec_init`
  (default geometric median; `mean` is sparsify's rule). W_enc: U(±1/√d_in), the `nn.Linear` default.
* Ours: the output scale c_out (below), the folding rule, and `reconstruct`'s skip convention.

Normalisation (ours, as `Dictionary` for the input): training sees x·c_in and y·c_out, with
c_in = √d_in / E‖x‖ and c_out = √d_out / E‖y‖ (`train.normalize = mean_norm`; both 1 with `none`).
Codes in raw units are f/c_in (encode is homogeneous in x as for every dictionary). In raw units

    ŷ_raw = (f_raw · c_in/c_out) W_dec + b_dec/c_out + x (c_in/c_out) W_skipᵀ

so `fold_input_scale` sets b_enc ← b_enc/c_in, W_dec ← W_dec·c_in/c_out, W_skip ← W_skip·c_in/c_out,
b_dec ← b_dec/c_out and c_in = c_out = 1, after which encode/decode/reconstruct give the same raw
outputs with the plain formulas.

Interface: `encode(x)` → codes; `decode(codes)` → the latents' part f W_dec + b_dec only (no skip:
it does not see x); `reconstruct(x)` = `reconstruct_from(x, encode(x))` → the full prediction ŷ
including W_skip x. Splicing and evaluation use `reconstruct`/`reconstruct_from`.
Without a target (trained on x alone) a transcoder autoencodes, as in sparsify.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import FeaturekitError
from . import kernels
from .base import Dictionary, Output
from .operators import topk
from .registry import check_k, register


@dataclass
class TranscoderParams:
    k: int = 32  #: latents kept per token

    def check(self, n_latents: int) -> None:
        check_k(self.k, n_latents)


@register(TranscoderParams)
class Transcoder(Dictionary):
    method = "transcoder"
    transcodes = True
    unit_norm_decoder = False
    uses_auxk = True

    def __init__(self, d_in: int, n_latents: int, k: int = 32, d_out: int | None = None, seed: int | None = None):
        super().__init__(d_in, n_latents)
        if not 0 < k <= n_latents:
            raise FeaturekitError(f"k must be in [1, n_latents={n_latents}], got {k}")
        d_out = d_in if d_out is None else int(d_out)
        if d_out <= 0:
            raise FeaturekitError(f"d_out must be positive, got {d_out}")
        self.k, self.d_out = k, d_out
        self.W_dec = nn.Parameter(torch.zeros(n_latents, d_out))  # zero-init (sparsify, transcode=True)
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.register_buffer("output_scale", torch.ones(()))
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        bound = 1 / math.sqrt(d_in)
        with torch.no_grad():
            self.W_enc.copy_(torch.rand(n_latents, d_in, generator=gen) * 2 * bound - bound)

    # -- training scale --------------------------------------------------------------------
    def pre_activation(self, x_scaled: torch.Tensor) -> torch.Tensor:
        return x_scaled @ self.W_enc.T + self.b_enc

    @property
    def encoder(self) -> kernels.Encoder:
        """π = x W_encᵀ + b_enc (no input centring) for the kernels."""
        return kernels.Encoder(self.W_enc, self.b_enc, None, self.kernel_choice)

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return topk(pre, self.k)

    def skip(self, x_scaled: torch.Tensor) -> torch.Tensor | float:
        """The skip path in the training scale (0 for the plain transcoder)."""
        return 0.0

    def target(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """y·c_out, y the first extra input (the MLP output); without one, x (autoencoding)."""
        return extra[0].float() * self.output_scale if extra else x

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Output:
        """Training forward on x·c_in (y is not needed: the trainer reads it through `target`);
        sparse kernels, same values and gradients as the dense formula."""
        x = self._check_input(x)
        picked = kernels.topk(x, self.encoder, self.k)  # as TopK: no (N, F) matrix outlives the selection
        y_hat, fast = kernels.sparse_forward(x, self.encoder, picked, self.W_dec, act=torch.relu)
        return self.output(x, y_hat + self.b_dec + self.skip(x), fast=fast)

    @torch.no_grad()
    def init_from_sample(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """b_enc = −mean(x)·W_encᵀ: pre-activations centred on the sample (sparsify's first-batch init)."""
        self.b_enc.copy_(-(x.float().mean(0) @ self.W_enc.T))

    # -- raw units ---------------------------------------------------------------------------
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes in raw units → the latents' part of ŷ in raw units, (f·c_in W_dec + b_dec)/c_out (no skip term)."""
        return ((codes * self.input_scale) @ self.W_dec + self.b_dec) / self.output_scale

    def reconstruct_from(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The full prediction ŷ in raw units from the raw input and its codes: decode(codes) + skip."""
        return self.decode(codes) + self.skip(self._check_input(x) * self.input_scale) / self.output_scale

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """c_in = c_out = 1 without changing encode/decode/reconstruct (module docstring)."""
        c_in, c_out = self.input_scale.clone(), self.output_scale.clone()
        self.b_enc.div_(c_in)
        self.W_dec.mul_(c_in / c_out)
        self.b_dec.div_(c_out)
        self._fold_skip(c_in / c_out)
        self.input_scale.fill_(1.0)
        self.output_scale.fill_(1.0)

    def _fold_skip(self, ratio: torch.Tensor) -> None:
        """Skip transcoders scale W_skip by c_in/c_out here."""

    def scales(self) -> dict[str, float]:
        return {"input_scale": float(self.input_scale), "output_scale": float(self.output_scale)}

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "topk", "k": self.k, "output": "y = codes W_dec + b_dec"}

    def hyperparams(self) -> dict[str, Any]:
        return {"k": self.k, "d_out": self.d_out}


@register(TranscoderParams)
class SkipTranscoder(Transcoder):
    """Transcoder + a linear skip path W_skip x (Paulo, Shabalin & Belrose 2025; sparsify
    `skip_connection=True`): W_skip (d_out × d_in) starts at zero and is trained with the rest."""

    method = "skiptranscoder"

    def __init__(self, d_in: int, n_latents: int, k: int = 32, d_out: int | None = None, seed: int | None = None):
        super().__init__(d_in, n_latents, k=k, d_out=d_out, seed=seed)
        self.W_skip = nn.Parameter(torch.zeros(self.d_out, d_in))

    def skip(self, x_scaled: torch.Tensor) -> torch.Tensor:
        return x_scaled @ self.W_skip.T

    def _fold_skip(self, ratio: torch.Tensor) -> None:
        self.W_skip.mul_(ratio)

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "topk", "k": self.k, "output": "y = codes W_dec + b_dec + x W_skip^T"}
