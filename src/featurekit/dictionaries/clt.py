"""Cross-layer transcoder (CLT): one dictionary for the MLPs of L layers at once (Ameisen et al. 2025,
"Circuit Tracing: Revealing Computational Graphs in Language Models", §2.1; circuit-tracer's
`cross_layer_transcoder`). Layer l (l = 0..L−1, the set's layers in order) has F latents that read its
MLP input x_l (width d) and write to its own and every later layer's MLP output y_l' (width d_out):

    π_l   = x_l W_enc,lᵀ + b_enc,l                    (F,)   no input centring, as the transcoder
    f_l   = ReLU(TopK_k(π_l))                          k latents per layer and token
    ŷ_l'  = Σ_{l ≤ l'} f_l W_dec,l→l' + b_dec,l'       (d_out,)

Loss (the training loop, `pipeline.circuit_sets`): Σ_l' mean over tokens of ‖y_l' − ŷ_l'‖² / d_out in
the training scale, where every layer's x_l and y_l are scaled to mean norm √d (so each output layer
weighs alike), plus nothing else: TopK is the sparsity (the field's recent CLTs; no aux-k here).

As a `Dictionary` the layers are laid side by side: x = [x_0 | … | x_{L−1}] (d_in = L·d), y likewise
(L·d_out), codes f = [f_0 | … | f_{L−1}] (n_latents = L·F; latent j belongs to layer j // F), and

    W_enc (L·F, d)        row j: what latent j reads from its own layer's input
    W_dec (L·F, L·d_out)  block (l, l') = W_dec,l→l' (F, d_out); blocks with l' < l are zero
    b_dec (L·d_out)       [b_dec,0 | … ]

so that ŷ = f W_dec + b_dec exactly as for the one-layer transcoder. The zero blocks are zero at init and
stay zero: training multiplies the decoder's gradient by `decoder_mask()` (`mask_decoder_grad`), and a
loaded file whose zero blocks are not zero is refused (`check_causal`). With L = 1 a CLT is a TopK
transcoder without aux-k.

Weights in a file are in raw units (`fold_layer_scales` folds the per-layer training scales c_in,l,
c_out,l' the way the transcoder folds its two scalars: b_enc,l /= c_in,l, W_dec,l→l' *= c_in,l/c_out,l',
b_dec,l' /= c_out,l'), so `input_scale` stays 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import FeaturekitError
from .base import Dictionary, Output
from .kernels import FastCodes, sparse_decode
from .registry import check_k, register


@dataclass
class CLTParams:
    k: int = 32  #: latents kept per token in EACH layer (n_latents is the total over the layers)
    n_layers: int = 1  #: layers the CLT spans (d_in and n_latents are split evenly between them)

    def check(self, n_latents: int) -> None:
        if self.n_layers < 1 or n_latents % self.n_layers:
            raise FeaturekitError(f"dictionary.n_latents={n_latents} must be a positive multiple of dictionary.n_layers="
                                  f"{self.n_layers} (every layer gets n_latents / n_layers latents)")
        check_k(self.k, n_latents // self.n_layers)


@register(CLTParams)
class CrossLayerTranscoder(Dictionary):
    method = "clt"
    transcodes = True
    unit_norm_decoder = False
    recon_loss = "squared_error"

    def __init__(self, d_in: int, n_latents: int, k: int = 32, n_layers: int = 1, d_out: int | None = None,
                 seed: int | None = None):
        n_layers = int(n_layers)
        d_out = d_in if d_out is None else int(d_out)
        if n_layers < 1 or d_in % n_layers or n_latents % n_layers or d_out % n_layers:
            raise FeaturekitError(f"a CLT over {n_layers} layers needs d_in ({d_in}), d_out ({d_out}) and n_latents "
                                  f"({n_latents}) divisible by n_layers: they are the layers' widths laid side by side")
        super().__init__(d_in, n_latents)
        self.n_layers, self.k, self.d_out = n_layers, int(k), d_out
        self.d_layer, self.d_out_layer, self.per_layer = d_in // n_layers, d_out // n_layers, n_latents // n_layers
        if not 0 < self.k <= self.per_layer:
            raise FeaturekitError(f"k must be in [1, latents per layer = {self.per_layer}], got {k}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        bound = 1 / math.sqrt(self.d_layer)  # as the transcoder: U(±1/√d), decoder zero
        self.W_enc = nn.Parameter((torch.rand(n_latents, self.d_layer, generator=gen) * 2 - 1) * bound)
        self.W_dec = nn.Parameter(torch.zeros(n_latents, d_out))
        self.b_dec = nn.Parameter(torch.zeros(d_out))
        self.register_buffer("output_scale", torch.ones(()))

    # -- the layer structure -----------------------------------------------------------------
    def latent_layer(self, j: torch.Tensor | int) -> torch.Tensor | int:
        """The layer (0..L−1) latent j reads."""
        return j // self.per_layer

    def layer_slice(self, layer: int, out: bool = False) -> slice:
        """Columns of layer `layer` in x (or in y with `out`)."""
        w = self.d_out_layer if out else self.d_layer
        return slice(layer * w, (layer + 1) * w)

    def decoder(self, source: int, target: int) -> torch.Tensor:
        """W_dec,source→target (F, d_out): what layer `source`'s latents write into layer `target`'s MLP output."""
        return self.W_dec[source * self.per_layer:(source + 1) * self.per_layer, self.layer_slice(target, out=True)]

    def decoder_mask(self) -> torch.Tensor:
        """(L·F, L·d_out) bool: True where W_dec may be non-zero (target layer ≥ source layer)."""
        src = torch.arange(self.n_latents, device=self.W_dec.device) // self.per_layer
        tgt = torch.arange(self.d_out, device=self.W_dec.device) // self.d_out_layer
        return tgt[None, :] >= src[:, None]

    @torch.no_grad()
    def mask_decoder_grad(self) -> None:
        """Zero the decoder gradient in the blocks that write to earlier layers (call after backward)."""
        if self.W_dec.grad is not None:
            self.W_dec.grad.mul_(self.decoder_mask())

    def check_causal(self) -> None:
        """Refuse weights that write from a layer into an earlier one."""
        if bool((self.W_dec.detach() * ~self.decoder_mask()).abs().max() > 0):
            raise FeaturekitError("this CLT's decoder writes from a layer into an earlier layer (a block below the "
                                  "diagonal is not zero); it was not trained as a CLT: retrain it")

    # -- the maths ---------------------------------------------------------------------------------
    def pre_activation(self, x_scaled: torch.Tensor) -> torch.Tensor:
        """π (..., L·F): each layer's block read from that layer's input."""
        x = x_scaled.reshape(*x_scaled.shape[:-1], self.n_layers, self.d_layer)
        W = self.W_enc.view(self.n_layers, self.per_layer, self.d_layer)
        pre = torch.einsum("...ld,lfd->...lf", x, W)
        return pre.reshape(*x_scaled.shape[:-1], self.n_latents) + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """ReLU(TopK_k) within each layer's block."""
        blocks = pre.reshape(*pre.shape[:-1], self.n_layers, self.per_layer)
        values, idx = blocks.topk(self.k, dim=-1, sorted=False)
        return torch.zeros_like(blocks).scatter(-1, idx, values.relu()).reshape(pre.shape)

    def target(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """y (the layers' MLP outputs side by side), the first extra input; x without one (autoencoding)."""
        return extra[0].float() if extra else x

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> Output:
        """Training forward: per-layer TopK on the dense π, then the sparse decode Σ f_j W_dec[j] (the
        kernels' CSR product: L·k rows per token, not the L·F × L·d_out matrix)."""
        x = self._check_input(x)
        pre = self.pre_activation(x)
        blocks = pre.view(-1, self.n_layers, self.per_layer)
        values, idx = blocks.topk(self.k, dim=-1, sorted=False)
        idx = (idx + torch.arange(self.n_layers, device=idx.device)[:, None] * self.per_layer).flatten(1)
        codes = values.relu().flatten(1)
        y_hat = sparse_decode(idx, codes, self.W_dec) + self.b_dec
        return self.output(x, y_hat, fast=FastCodes(self.n_latents, idx=idx, values=codes))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """ŷ = f W_dec + b_dec (raw units: the weights are folded, `input_scale` is 1)."""
        return codes @ self.W_dec + self.b_dec

    def reconstruct_from(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.decode(codes)

    # -- raw units ----------------------------------------------------------------------------------
    @torch.no_grad()
    def fold_layer_scales(self, c_in: torch.Tensor, c_out: torch.Tensor) -> None:
        """Weights trained on (c_in,l · x_l, c_out,l · y_l) → the same codes/c_in,l and outputs in raw units."""
        c_in, c_out = torch.as_tensor(c_in, dtype=self.W_dec.dtype), torch.as_tensor(c_out, dtype=self.W_dec.dtype)
        if c_in.shape != (self.n_layers,) or c_out.shape != (self.n_layers,):
            raise FeaturekitError(f"fold_layer_scales needs one input and one output scale per layer ({self.n_layers})")
        c_in, c_out = c_in.to(self.W_dec.device), c_out.to(self.W_dec.device)
        self.b_enc.div_(c_in.repeat_interleave(self.per_layer))
        self.W_dec.mul_(c_in.repeat_interleave(self.per_layer)[:, None] / c_out.repeat_interleave(self.d_out_layer)[None, :])
        self.b_dec.div_(c_out.repeat_interleave(self.d_out_layer))

    def fold_input_scale(self) -> None:
        if float(self.input_scale) != 1.0 or float(self.output_scale) != 1.0:
            raise FeaturekitError("a CLT keeps its weights in raw units (input_scale = output_scale = 1); use fold_layer_scales")

    def scales(self) -> dict[str, float]:
        return {"input_scale": float(self.input_scale), "output_scale": float(self.output_scale)}

    def inference_rule(self) -> dict[str, Any]:
        return {"activation": "topk per layer", "k": self.k, "n_layers": self.n_layers,
                "output": "y = codes W_dec + b_dec; inputs/outputs are the layers' MLP inputs/outputs side by side"}

    def hyperparams(self) -> dict[str, Any]:
        return {"k": self.k, "n_layers": self.n_layers, "d_out": self.d_out}
