"""The sparse training forward the sparse methods share.

A selection rule picks (token, latent) pairs from the pre-activations π = (x − shift) Wᵀ + b without
grad; the kernels value the picked pairs with a gradient through those pairs only, and the decoder sums
their rows:

    picked    = topk(x, enc, k)                  (or batch_topk, from_mask, Picked(idx, …))
    codes     = act(π at the picked pairs)       `sparse_codes`
    x̂ − b_dec = Σ_j codes[n, j] · W_dec[idx[n, j]]   `sparse_forward` (both, with the `FastCodes`)

Names used throughout:
* `Encoder(W, b, shift, choice)`: the affine map π = (x − shift) Wᵀ + b, and the dictionary's `KernelChoice`.
* `Picked`: a selection. `idx` (N, m): each token's picked latents; `keep` (N, m): the real slots where
  rows pick different numbers (padding: column 0, keep False); `pair_pre` (N, m): π at the picked pairs,
  without grad, where the selection computed them; `pre` (N, F): the whole π without grad, where the
  selection computed it. `ragged`: the kernels skip the padding (else they compute it and multiply by keep).
* `FastCodes`: what the kernels hand the dictionary's `Output` beside x̂: the codes in sparse form or built
  on demand, precomputed firing counts, and the accessors of π that need no (N, F) matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .certified import certified_batch_topk
from .gemm import autocast_dtype, encoder_preact
from .machine import KernelChoice
from .selection import batch_topk_sparse, certified_chosen, columns_topk, topk_preact, with_width
from .sparse import gather_linear, mask_to_sparse, sparse_decode


class Encoder(NamedTuple):
    """π = (x − shift) Wᵀ + b (shift None: x Wᵀ + b), and the kernel choices of the dictionary it belongs to."""

    W: torch.Tensor
    b: torch.Tensor
    shift: torch.Tensor | None = None
    choice: KernelChoice | None = None

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        """x − shift, without grad: what W multiplies."""
        with torch.no_grad():
            return x if self.shift is None else x - self.shift

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """π (N, F) without grad, through the GEMM the kernel choice takes."""
        return encoder_preact(self.centred(x), self.W, self.b, self.choice)


@dataclass
class Picked:
    """A selection's (token, latent) pairs (module docstring)."""

    idx: torch.Tensor
    keep: torch.Tensor | None = None
    pair_pre: torch.Tensor | None = None
    pre: torch.Tensor | None = None
    ragged: bool = False


@dataclass
class FastCodes:
    """The codes and pre-activation accessors of a fast forward (speed-only; `Output` reads them):

    * `idx`, `values` (N, m): the codes in sparse form (0 in padding; `values` with grad), or
    * `dense`: a function building the dense (N, F) codes when first read;
    * `fire_counts` (F,): the batch's firing count per latent, where the kernels counted it already;
    * `top_pre(k, among, signed)` → (idx, pair_pre): aux-k's candidates (each token's k largest π among the
      latents in `among`, no grad), computed from those latents' columns only (set when no (N, F) π is kept);
    * `pre_at(idx, pair_pre=None)` → π at the pairs idx, with a sparse gradient; `pair_pre` are the same
      values without grad where known (from `top_pre`), else they are computed exactly."""

    n_latents: int
    idx: torch.Tensor | None = None
    values: torch.Tensor | None = None
    dense: Callable[[], torch.Tensor] | None = None
    fire_counts: torch.Tensor | None = None
    top_pre: Callable[[int, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor]] | None = None
    pre_at: Callable[..., torch.Tensor] | None = None


@torch.no_grad()
def topk(x: torch.Tensor, enc: Encoder, k: int, signed: bool = False) -> Picked:
    """TopK_k(π) per token (by |π| when `signed`), exact, with π at the picks; no (N, F) matrix outlives it."""
    pair_pre, idx = topk_preact(enc.centred(x), enc.W, enc.b, k, signed, enc.choice)
    return Picked(idx, pair_pre=pair_pre)


@torch.no_grad()
def batch_topk(x: torch.Tensor, enc: Encoder, k: int, signed: bool = False) -> Picked | None:
    """BatchTopK: the batch's B·k largest π (by |π| when `signed`), those > 0, each token's in column order
    (ragged). In fp32 on CPU through `certified_batch_topk` (a bf16 product, exact fp32 values for the entries
    that can reach the cut, no (N, F) matrix kept) where the kernel choice finds it faster. None where a token
    would keep more than half of the latents (the caller's dense formula)."""
    centred = enc.centred(x)
    if certified_chosen(enc.choice, "batch top-k selection", fp32_batch_topk, certified_batch_topk, centred, enc.W, enc.b, k,
                        signed):
        found = with_width(enc.choice, "batchtopk", certified_batch_topk, centred, enc.W, enc.b, k, signed)
        if found is not None:
            idx, keep, pair_pre = found
            return Picked(idx, keep, pair_pre=pair_pre, ragged=True)
    sparse, pre = fp32_batch_topk(centred, enc.W, enc.b, k, signed, enc.choice)
    return None if sparse is None else Picked(*sparse, pre=pre, ragged=True)


def fp32_batch_topk(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor, k: int, signed: bool, choice: KernelChoice | None = None):
    """BatchTopK's selection through the whole product: (`batch_topk_sparse`'s answer, the (N, F) product)."""
    pre = encoder_preact(x, W, b, choice)
    return batch_topk_sparse(pre.abs() if signed else pre, k), pre


def from_mask(mask: torch.Tensor, pre: torch.Tensor) -> Picked:
    """The pairs of a (N, F) bool mask (a rule with a varying count per token), padded to the widest row."""
    idx, keep = mask_to_sparse(mask)
    return Picked(idx, keep, pre=pre)


def sparse_codes(x: torch.Tensor, enc: Encoder, picked: Picked,
                 act: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, FastCodes]:
    """(codes = act(π at the picked pairs) (N, m), 0 in the padding, with a gradient through the pairs only;
    the `FastCodes` holding them), for a method that decodes them itself."""
    pre = gather_linear(x, enc.W, enc.b, picked.idx, picked.pre, shift=enc.shift, keep=picked.keep if picked.ragged else None,
                        pair_pre=picked.pair_pre)
    codes = pre if act is None else act(pre)
    codes = codes if picked.keep is None else codes * picked.keep
    return codes, fast_codes(x, enc, picked.pre, picked.idx, codes)


def sparse_forward(x: torch.Tensor, enc: Encoder, picked: Picked, W_dec: torch.Tensor,
                   act: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, FastCodes]:
    """(x̂ − b_dec = Σ_j codes[n, j] W_dec[idx[n, j]], the `FastCodes`), the codes from `sparse_codes`."""
    codes, fast = sparse_codes(x, enc, picked, act)
    return sparse_decode(picked.idx, codes, W_dec, keep=picked.keep if picked.ragged else None), fast


def fast_codes(x: torch.Tensor, enc: Encoder, pre: torch.Tensor | None, idx: torch.Tensor | None = None,
               values: torch.Tensor | None = None, **fields) -> FastCodes:
    """`FastCodes` for a forward on x whose selection kept `pre` (N, F) (None: aux-k computes the columns it
    asks for, in the precision of the forward: a bf16 autocast is captured now)."""

    def pre_at(at: torch.Tensor, pair_pre: torch.Tensor | None = None) -> torch.Tensor:
        return gather_linear(x, enc.W, enc.b, at, pre, shift=enc.shift, pair_pre=pair_pre)

    top_pre = None
    if pre is None:
        device, low = x.device.type, autocast_dtype(x.device)

        def top_pre(k: int, among: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
            inputs = enc.centred(x).detach()
            with torch.autocast(device, dtype=low or torch.bfloat16, enabled=low is not None):
                return columns_topk(inputs, enc.W.detach(), enc.b.detach(), k, among, signed)

    return FastCodes(enc.W.shape[0], idx=idx, values=values, top_pre=top_pre, pre_at=pre_at, **fields)
