"""The `Dictionary` interface every method implements.

A dictionary maps an activation x (d values) to codes f (F values, mostly zero) and back:

    encode(x) -> f            decode(f) -> x_hat            forward(x) -> Output

`W_dec` has shape (F, d); its rows are the feature directions. Every dictionary carries an
`input_scale` c (a buffer): it was trained on c·x. `encode` and `decode` take and return raw
activations; `fold_input_scale()` rewrites the biases so that c becomes 1 without changing any
output (b_dec ← b_dec/c, b_enc ← b_enc/c, thresholds ← thresholds/c; codes then come out in raw units).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from ..errors import FeaturekitError
from . import kernels
from .kernels import FastCodes, KernelChoice, count_true, densify, masked_topk


class Output:
    """What `Dictionary.forward` returns: the reconstruction `x_hat`, the codes, the pre-activations and
    `losses`, named scalar terms the trainer sums into the loss.

    One name per concept:
    * `pre`: π (N, F), the pre-activations, where the forward keeps them (None otherwise).
    * `codes`: the dense (N, F) codes; `idx`, `values` (N, m): their sparse form (latent indices, and the
      codes there, 0 in padding), where the forward made one. A sparse form is densified only if `codes` is
      read: the trainer's statistics (`fire_counts`, `l0`) use it, so a training step of a sparse method
      never writes an (N, F) code matrix.
    * `top_pre(k, among, signed)` → (idx, pair_pre): aux-k's candidates, each token's k largest π among the
      latents in `among`, without grad.
    * `pre_at(idx, pair_pre=None)`: π at the (token, latent) pairs `idx`, with gradient; `pair_pre`, the same
      values without grad where known (from `top_pre`), spares recomputing them.
    * `partial`: named further reconstructions the trainer scores with the same reconstruction loss as
      `x_hat` (Matryoshka: each nested prefix's x̂), so the method need not know how the loss is computed.
    A fast forward passes `fast`, the `kernels.FastCodes` its kernels filled: the sparse codes, or a function
    building dense ones, precomputed firing counts, and the accessors of π that need no (N, F) matrix."""

    def __init__(self, x_hat: torch.Tensor, codes: torch.Tensor | None = None, pre: torch.Tensor | None = None,
                 losses: dict[str, torch.Tensor] | None = None, fast: FastCodes | None = None):
        if codes is None and (fast is None or (fast.values is None and fast.dense is None)):
            raise ValueError("Output needs dense codes or kernels.FastCodes holding codes")
        self.x_hat, self.pre, self.fast, self._codes = x_hat, pre, fast, codes
        self._fire_counts = None if fast is None else fast.fire_counts
        self.losses: dict[str, torch.Tensor] = {} if losses is None else losses
        self.partial: dict[str, torch.Tensor] = {}

    @property
    def idx(self) -> torch.Tensor | None:
        return None if self.fast is None else self.fast.idx

    @property
    def values(self) -> torch.Tensor | None:
        return None if self.fast is None else self.fast.values

    @property
    def _sparse(self) -> bool:
        """The codes exist in sparse form only."""
        return self._codes is None and self.fast.dense is None

    @property
    def has_pre(self) -> bool:
        """True when `top_pre` can answer (the pre-activations are kept or can be computed)."""
        return self.pre is not None or (self.fast is not None and self.fast.top_pre is not None)

    def top_pre(self, k: int, among: torch.Tensor, signed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(idx, pair_pre) (N, k), no grad: each token's k largest pre-activations among the latents in
        `among` (F,) bool, ranked by |π| when `signed`."""
        if self.pre is not None:
            return masked_topk(self.pre.reshape(-1, self.pre.shape[-1]), k, among, signed)
        if self.fast is None or self.fast.top_pre is None:
            raise ValueError("this output keeps no pre-activations")
        return self.fast.top_pre(k, among, signed)

    def pre_at(self, idx: torch.Tensor, pair_pre: torch.Tensor | None = None) -> torch.Tensor:
        """π at columns idx (N, m) with its gradient (the aux-k losses' values): through the kernels where the
        forward was fast, else gathered from `pre` (which then carries its graph)."""
        if self.fast is not None and self.fast.pre_at is not None:
            return self.fast.pre_at(idx, pair_pre)
        return self.pre.gather(-1, idx)

    @property
    def codes(self) -> torch.Tensor:
        if self._codes is None:
            self._codes = self.fast.dense() if self.fast.dense is not None else densify(self.idx, self.values, self.fast.n_latents)
        return self._codes

    @torch.no_grad()
    def fire_counts(self) -> torch.Tensor:
        """(F,) number of tokens of the batch on which each latent is non-zero (computed once)."""
        if self._fire_counts is None:
            if self._sparse:
                fired = self.values.detach() != 0
                self._fire_counts = torch.bincount(self.idx[fired], minlength=self.fast.n_latents)
            else:
                codes = self.codes.detach()
                self._fire_counts = count_true((codes != 0).reshape(-1, codes.shape[-1]), 0).long()
        return self._fire_counts

    @torch.no_grad()
    def l0(self) -> float:
        """Mean number of non-zero codes per token."""
        tokens = self.x_hat.shape[0]
        return self.fire_counts().sum().item() / max(tokens, 1)

    @torch.no_grad()
    def nonzero_values(self) -> torch.Tensor:
        """The non-zero codes of the batch, flattened."""
        v = self.values.detach() if self._sparse else self.codes.detach()
        return v[v != 0]


class Dictionary(nn.Module):
    """Base class. Subclasses set `method`, define `W_enc`, `b_enc`, `W_dec`, `b_dec` and `activation`."""

    method: ClassVar[str] = ""
    #: True when training keeps decoder rows at unit norm (gradient projection + renormalisation).
    unit_norm_decoder: ClassVar[bool] = True
    #: reconstruction loss the trainer uses: "fvu" (batch FVU) or "squared_error" (Σ_d, mean over tokens).
    recon_loss: ClassVar[str] = "fvu"
    #: whether the trainer adds the aux-k loss for dead latents.
    uses_auxk: ClassVar[bool] = False
    #: codes keep their sign (AbsTopK): selection by |π|, "fired" means ≠ 0.
    signed: ClassVar[bool] = False
    #: training needs the LM-loss gradient at the site beside x (g-SAE): forward(x, grad).
    needs_gradient: ClassVar[bool] = False
    #: None: trained by the gradient trainer. Otherwise the class of a closed-form / greedy fitter (ITDA, SNMF) that
    #: `pipeline.run_fit` feeds the training activations in stream order (no shuffle; `f.passes` passes, default 1):
    #: `F.from_config(dictionary_cfg, d_in, seed=, batch_size=)`; `f.update(x, context_idx, position, token_ids)`
    #: → dict of metrics for metrics.jsonl; `f.done` (stop reading); `f.state()` / `f.load_state(tensors)`
    #: (checkpoints; resume skips `tokens_seen`); `f.finish()` → the fitted Dictionary.
    fitter: ClassVar[type | None] = None
    #: trained to predict another tensor y (the first extra input: forward(x, y)) than the one it reads
    #: (transcoders: MLP output from MLP input); b_dec is then the output bias and an `output_scale`
    #: buffer c_out scales y as input_scale scales x.
    transcodes: ClassVar[bool] = False

    def __init__(self, d_in: int, n_latents: int):
        super().__init__()
        if d_in <= 0 or n_latents <= 0:
            raise FeaturekitError(f"d_in and n_latents must be positive, got {d_in}, {n_latents}")
        self.d_in = d_in
        self.n_latents = n_latents
        self.W_enc = nn.Parameter(torch.empty(n_latents, d_in))
        self.b_enc = nn.Parameter(torch.zeros(n_latents))
        self.W_dec = nn.Parameter(torch.empty(n_latents, d_in))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        self.register_buffer("input_scale", torch.ones(()))
        #: this dictionary's per-machine kernel choices (`kernels.kernel_choices(self)` lists them)
        self.kernel_choice = KernelChoice()

    # -- the method-specific part ---------------------------------------------------------
    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        """Codes from pre-activations (in the training scale)."""
        raise NotImplementedError

    def inference_rule(self) -> dict[str, Any]:
        """What runs at inference, recorded in featurekit.json (activation name and its params)."""
        raise NotImplementedError

    def hyperparams(self) -> dict[str, Any]:
        """Constructor arguments beyond d_in and n_latents (recorded so `load` can rebuild)."""
        return {}

    def file_metadata(self) -> dict[str, Any]:
        """Extra top-level entries for featurekit.json (e.g. where ITDA's atom provenance is stored)."""
        return {}

    def after_step(self, out: Output) -> None:
        """Called by the trainer after each optimiser step (e.g. to track an inference threshold)."""

    def calibrate(self, batches: list[torch.Tensor]) -> dict[str, Any] | None:
        """Called once after training with training-scale batches at the training batch size: re-estimate
        inference-only state (e.g. BatchTopK's threshold) from the final weights. Returns what it set, recorded
        in featurekit.json under training.inference_calibration, or None when the method has nothing to set."""
        return None

    def extra_losses(self, x: torch.Tensor, out: Output) -> dict[str, torch.Tensor]:
        """Method-specific loss terms (e.g. the L1 penalty), in the training scale."""
        return {}

    def target(self, x: torch.Tensor, *extra: torch.Tensor) -> torch.Tensor:
        """What `forward(x, *extra).x_hat` is trained to match, in the training scale: x (autoencoders)."""
        return x

    def init_from_sample(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """Data-dependent initialisation beyond c and b_dec (training-scale samples; called once by the trainer)."""

    def scales(self) -> dict[str, float]:
        """The normalisation scales the weights were trained under (recorded in featurekit.json)."""
        return {"input_scale": float(self.input_scale)}

    # -- shared machinery -------------------------------------------------------------------
    def pre_activation(self, x_scaled: torch.Tensor) -> torch.Tensor:
        """π = (x·c − b_dec) W_encᵀ + b_enc, on already-scaled input."""
        return (x_scaled - self.b_dec) @ self.W_enc.T + self.b_enc

    @property
    def encoder(self) -> kernels.Encoder:
        """`pre_activation` as the kernels take it: π = (x − b_dec) W_encᵀ + b_enc, with this dictionary's kernel choices."""
        return kernels.Encoder(self.W_enc, self.b_enc, self.b_dec, self.kernel_choice)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations (..., d) → codes (..., F) in raw units (divided by c), in the dictionary's dtype."""
        x = self._check_input(x)
        return self.activation(self.pre_activation(x * self.input_scale)) / self.input_scale

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes in raw units → reconstruction in raw units: x̂ = f W_dec + b_dec/c."""
        return codes @ self.W_dec + self.b_dec / self.input_scale

    def forward(self, x: torch.Tensor) -> Output:
        """Training-scale forward: x is already multiplied by c; returns codes and x̂ in that scale."""
        x = self._check_input(x)
        pre = self.pre_activation(x)
        codes = self.activation(pre)
        return self.output(x, codes @ self.W_dec + self.b_dec, codes=codes, pre=pre)

    def sparse_output(self, x: torch.Tensor, picked: kernels.Picked, act=None) -> Output:
        """The sparse forward from a selection: codes = act(π at the picked pairs), x̂ = Σ codes · W_dec[idx] + b_dec
        (`kernels.sparse_forward`: the same values and gradients as the dense formula), and the method's losses."""
        x_hat, fast = kernels.sparse_forward(x, self.encoder, picked, self.W_dec, act)
        return self.output(x, x_hat + self.b_dec, pre=picked.pre, fast=fast)

    def output(self, x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor | None = None, pre: torch.Tensor | None = None,
               fast: FastCodes | None = None) -> Output:
        """The forward's `Output`, with the method's `extra_losses`."""
        out = Output(x_hat, codes=codes, pre=pre, fast=fast)
        out.losses.update(self.extra_losses(x, out))
        return out

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """Raw in, raw out: decode(encode(x)) (transcoders: the prediction of y, skip path included)."""
        return self.reconstruct_from(x, self.encode(x))

    def reconstruct_from(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """The reconstruction given the raw input and its codes: decode(codes); a skip transcoder adds W_skip x."""
        return self.decode(codes)

    @torch.no_grad()
    def fold_input_scale(self) -> None:
        """Make c = 1 without changing encode/decode (biases and thresholds divided by c)."""
        c = self.input_scale.clone()
        self.b_dec.div_(c)
        self.b_enc.div_(c)
        self._fold_thresholds(c)
        self.input_scale.fill_(1.0)

    def _fold_thresholds(self, c: torch.Tensor) -> None:
        """Subclasses with thresholds divide them by c here."""

    @torch.no_grad()
    def init_tied(self, seed: int | None, row_norm: float = 1.0) -> None:
        """W_dec = random directions with rows of norm `row_norm`, W_enc = W_dec (encoder matrix = decoderᵀ)."""
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        w = torch.randn(self.n_latents, self.d_in, generator=gen)
        self.W_dec.copy_(w / w.norm(dim=1, keepdim=True).clamp_min(1e-12) * row_norm)
        self.W_enc.copy_(self.W_dec)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale each decoder row to unit norm."""
        w = self.W_dec
        w.mul_(torch.linalg.vector_norm(w, dim=1, keepdim=True).clamp_min_(1e-12).reciprocal_())

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove from each decoder row's gradient its component along the row (unit-norm rows)."""
        w, g = self.W_dec, self.W_dec.grad
        if g is not None:  # g -= (g·w / w·w) w, in three passes over the matrix
            coef = torch.linalg.vecdot(g, w).div_(torch.linalg.vector_norm(w, dim=1).square_().clamp_min_(1e-24)).neg_()
            g.addcmul_(w, coef.unsqueeze(1))

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """Check the width and device; return x in the dictionary's dtype (bf16 activations are fine)."""
        if x.device != self.W_enc.device:
            raise FeaturekitError(f"activations are on {x.device} but the dictionary is on {self.W_enc.device}; "
                                  f"move one of them (dictionary.to(device))")
        if x.shape[-1] != self.d_in:
            raise FeaturekitError(
                f"activation has {x.shape[-1]} dimensions but this {self.method} dictionary expects "
                f"{self.d_in}; use a dictionary trained on this site, or harvest the site it was trained on"
            )
        return x.to(self.W_enc.dtype)

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, n_latents={self.n_latents}, {self.inference_rule()}"
