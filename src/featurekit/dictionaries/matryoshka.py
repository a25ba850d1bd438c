"""Matryoshka SAE over BatchTopK (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders", ICML 2025, arXiv 2503.17547; the official code the
paper names is dictionary_learning `trainers/matryoshka_batch_top_k.py`).

The latents are ordered and split into nested prefixes of widths m_1 < m_2 < … < m_n = F (the
paper's set of nested dictionary sizes). Selection is BatchTopK over the whole dictionary (Bussmann,
Leask & Nanda 2024, `batchtopk.py`), Z = the codes; every prefix must reconstruct x alone:

    x̂_i = Z[:, :m_i] W_dec[:m_i] + b_dec,         L = Σ_i recon(x, x̂_i)  + α·aux-k

recon is the trainer's reconstruction loss (batch FVU); the forward returns the full level x̂_n as
x_hat and the inner levels in `Output.partial` as `recon_prefix{m_i}`, which the trainer scores with
the same loss (logged per level).
No gradient is stopped between levels (as the official code). Aux-k uses the residual of the full
reconstruction (official code). x̂_i are computed incrementally: one sparse decode of the kept
latents into per-(token, group) partial sums, then a cumulative sum over groups (`grouped_decode`).

Choices of ours, recorded in the file's hyperparams/inference_rule:
* Level weights: we SUM the levels (every level weight 1, as SAELens's Matryoshka; the paper's
  formula is a sum over the nested sizes [memory]). The official dictionary_learning trainer
  averages them (w_i = 1/n). Under Adam the two differ only in the weight of aux-k relative to
  reconstruction (n times smaller here).
* Default prefixes: F/16, F/8, F/4, F/2, F — the geometric grouping of the Matryoshka authors'
  repository (bartbussmann/matryoshka_sae `main.py`: group sizes F/16, F/16, F/8, F/4, F/2).
  `prefixes` are cumulative widths (the paper's m_i), not group sizes; F is appended if missing.
* Inference: the BatchTopK global threshold θ (`batchtopk.py`); since that rule is per latent, the
  codes of prefix m are the first m codes and `reconstruct_prefix` runs any level as its own SAE.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import FeaturekitError
from . import kernels
from .base import Output
from .batchtopk import BatchTopKSAE
from .operators import batch_topk
from .registry import check_decay, check_k, register


def default_prefixes(n_latents: int) -> list[int]:
    """F/16, F/8, F/4, F/2, F (widths below 1 and repeats dropped)."""
    return sorted({max(1, n_latents // 2**i) for i in range(4, -1, -1)})


def resolve_prefixes(prefixes: list[int] | None, n_latents: int) -> list[int]:
    """Check nested prefix widths (strictly increasing, in [1, F]) and end them at F."""
    if prefixes is None:
        return default_prefixes(n_latents)
    widths = [int(m) for m in prefixes]
    if not widths or any(b <= a for a, b in zip(widths, widths[1:])) or widths[0] < 1 or widths[-1] > n_latents:
        raise FeaturekitError(f"dictionary.prefixes must be strictly increasing widths in [1, n_latents={n_latents}], "
                              f"e.g. [{n_latents // 8}, {n_latents // 2}, {n_latents}]; got {prefixes}")
    return widths if widths[-1] == n_latents else [*widths, n_latents]


def grouped_decode(idx: torch.Tensor, values: torch.Tensor, W_dec: torch.Tensor, prefixes: list[int],
                   keep: torch.Tensor | None = None) -> torch.Tensor:
    """Partial decodes per group: out[b, g] = Σ_{j : idx[b,j] in group g} values[b,j]·W_dec[idx[b,j]].

    Groups are [0, m_1), [m_1, m_2), …; `keep` (bool, like idx) drops entries known to be zero.
    One `embedding_bag` over the kept entries, one bag per (token, group): work ∝ kept entries · d.
    Returns (B, n_groups, d); its cumulative sum over groups gives the prefix reconstructions.
    """
    rows, n = idx.shape[0], len(prefixes)
    bounds = torch.tensor(prefixes, device=idx.device)
    bag = torch.bucketize(idx, bounds, right=True) + n * torch.arange(rows, device=idx.device)[:, None]
    if keep is None:
        keep = torch.ones_like(idx, dtype=torch.bool)
    bag, latents, weights = bag[keep], idx[keep], values[keep]
    if bag.numel() == 0:
        return values.new_zeros(rows, n, W_dec.shape[1])
    order = bag.argsort(stable=True)
    counts = torch.bincount(bag, minlength=rows * n)
    offsets = counts.cumsum(0) - counts
    out = F.embedding_bag(latents[order], W_dec, offsets, mode="sum", per_sample_weights=weights[order])
    return out.view(rows, n, -1)


@dataclass
class MatryoshkaParams:
    k: int = 32  #: mean latents per token over a batch (BatchTopK)
    #: nested widths m_1 < … < F (F appended if missing); null → F/16, F/8, F/4, F/2, F
    prefixes: list[int] | None = None
    threshold_decay: float = 0.99  #: EMA factor of the inference threshold

    def check(self, n_latents: int) -> None:
        check_k(self.k, n_latents)
        check_decay(self.threshold_decay)
        resolve_prefixes(self.prefixes, n_latents)


@register(MatryoshkaParams)
class MatryoshkaSAE(BatchTopKSAE):
    method = "matryoshka"

    def __init__(self, d_in: int, n_latents: int, k: int = 32, prefixes: list[int] | None = None,
                 threshold_decay: float = 0.99, seed: int | None = None):
        super().__init__(d_in, n_latents, k=k, threshold_decay=threshold_decay, seed=seed)
        self.prefixes = resolve_prefixes(prefixes, n_latents)

    def forward(self, x: torch.Tensor) -> Output:
        """BatchTopK selection (sparse kernels when exact, else dense) and every prefix's reconstruction."""
        x = self._check_input(x)
        pre = self.encoder.pre(x)  # π, no grad
        sparse = kernels.batch_topk_sparse(pre, self.k)  # Z: the batch's B·k largest
        if sparse is None:  # some token keeps more than half of the latents: the dense formula
            pre = self.pre_activation(x)
            codes, fast = batch_topk(pre, self.k), None
            bounds = [0, *self.prefixes]
            partial = torch.stack([codes[:, a:b] @ self.W_dec[a:b] for a, b in zip(bounds, bounds[1:])], dim=1)
        else:
            picked = kernels.Picked(*sparse, pre=pre)
            values, fast = kernels.sparse_codes(x, self.encoder, picked)
            codes = None
            partial = grouped_decode(picked.idx, values, self.W_dec, self.prefixes, picked.keep)
        levels = partial.cumsum(dim=1) + self.b_dec  # (B, n, d): x̂ of every prefix
        out = self.output(x, levels[:, -1], codes=codes, pre=pre, fast=fast)
        out.partial = {f"recon_prefix{width}": levels[:, i] for i, width in enumerate(self.prefixes[:-1])}  # scored like x̂
        return out

    def reconstruct_prefix(self, x: torch.Tensor, width: int) -> torch.Tensor:
        """Raw in, raw out, with only the first `width` latents (the inference rule; any width works,
        the trained levels are `prefixes`)."""
        codes = self.encode(x)[..., :width]
        return codes @ self.W_dec[:width] + self.b_dec / self.input_scale

    def inference_rule(self) -> dict[str, Any]:
        return {**super().inference_rule(), "prefixes": list(self.prefixes)}

    def hyperparams(self) -> dict[str, Any]:
        return {**super().hyperparams(), "prefixes": list(self.prefixes)}
