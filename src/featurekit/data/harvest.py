"""Harvest activations: run a model over packed contexts and keep the masked-in tokens.

For each batch of contexts, all sites are captured in ONE forward pass that stops after the deepest
needed block (`models.hooks.capture_activations`). Row ``i`` of a yielded ActivationBatch is the
token ``input_ids[context_idx[i], position[i]]`` (= ``token_ids[i]``); rows come in context-major,
position-minor order, and only tokens with ``mask`` True are kept (typically BOS / special tokens and
position 0 are masked out; see `data.tokens.token_mask`). Activations keep the model dtype (float32
or bfloat16, to save memory; consumers cast) and are moved to ``out_device`` (CPU by default).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from featurekit.data.batch import ActivationBatch
from featurekit.errors import FeaturekitError
from featurekit.models.hooks import capture_activations, capture_gradients, gradient_key

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def _cpu_has_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16 flags)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(requested: str, device: str | None = None) -> torch.dtype:
    """Map a dtype name to a torch dtype; ``"auto"`` picks bfloat16 where it is fast, else float32.

    "auto" gives bfloat16 on a CUDA device that supports it, or on a CPU with AVX512-BF16/AMX-BF16;
    float32 otherwise. ``device`` ("cpu", "cuda", ...) defaults to CUDA when available.
    """
    name = str(requested).lower().removeprefix("torch.")
    if name != "auto":
        if name not in _DTYPES:
            raise FeaturekitError(f"unknown dtype {requested!r}: use 'auto', 'float32', 'bfloat16' or 'float16'.")
        return _DTYPES[name]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def norm_outliers(acts: torch.Tensor, keep: torch.Tensor, multiple: float | None) -> torch.Tensor:
    """Positions of `keep` (bool, shaped like acts[..., 0]) whose activation norm exceeds `multiple`
    times the median norm over the kept positions: attention-sink tokens with massive activations
    (SmolLM2: ≈ 23,000 against a median ≈ 140 at layer 12, found at position 1 when position 0 is
    a newline or a digit; ordinary tokens stay below ≈ 10× the median, so 50× is the default cut).
    Returns a bool mask of the outliers (all False when multiple is None)."""
    if multiple is None or not keep.any():
        return torch.zeros_like(keep)
    norms = acts.float().norm(dim=-1)
    return keep & (norms > multiple * norms[keep].median())


def drop_outliers(keep: torch.Tensor, acts: Sequence[torch.Tensor], max_norm_multiple: float | None) -> torch.Tensor:
    """`keep` without the norm outliers of each site in turn (`norm_outliers`; each median over the tokens still
    kept after the sites before it): the one rule of `harvest` and `select_sites`."""
    for act in acts:
        keep = keep & ~norm_outliers(act, keep.to(act.device), max_norm_multiple).to(keep.device)
    return keep


def select_sites(batch: ActivationBatch, sites: Sequence[str], max_norm_multiple: float | None) -> ActivationBatch:
    """The part of ``batch`` (harvested without an outlier cut) that a harvest of ``sites`` alone would have
    kept: those sites' activations, tokens dropped by the same rule and order as `harvest` (site by site, each
    median over the rows still kept). One model pass over many sites can so fill several caches, each equal to
    its own harvest."""
    keep = torch.ones(batch.n_tokens, dtype=torch.bool, device=batch.token_ids.device)
    keep = drop_outliers(keep, [batch.acts[site] for site in sites], max_norm_multiple)
    return ActivationBatch(acts={site: batch.acts[site][keep.to(batch.acts[site].device)] for site in sites},
                           token_ids=batch.token_ids[keep], context_idx=batch.context_idx[keep], position=batch.position[keep])


def harvest(model: Any, input_ids: torch.Tensor, sites: Sequence[str], *, batch_size: int,
            mask: torch.Tensor | None = None, progress: bool = True,
            out_device: str | torch.device = "cpu", max_norm_multiple: float | None = None,
            gradients: bool = False) -> Iterator[ActivationBatch]:
    """Yield one ActivationBatch per ``batch_size`` contexts of ``input_ids`` (N, T), masked-in tokens only.

    ``model`` is a LoadedModel or an HF model; ``mask`` (N, T) bool (None keeps every token).
    Batches whose mask is all False are skipped without running the model. With ``progress`` a
    tqdm bar counts the tokens run through the model (tokens/s). With ``max_norm_multiple`` a token is
    also dropped when, at any site, its norm exceeds that multiple of the batch's median norm
    (`norm_outliers`), so that all sites keep the same tokens. With ``gradients`` each batch also
    carries, under `gradient_key(site)`, the gradient of the model's next-token loss with respect to
    the activation (`models.hooks.capture_gradients`: a full forward and a backward per batch).
    """
    if input_ids.ndim != 2:
        raise FeaturekitError(f"harvest needs input_ids of shape (N, T), got {tuple(input_ids.shape)}: "
                              "pack texts with featurekit.data.tokens.pack first.")
    if batch_size < 1:
        raise FeaturekitError(f"batch_size must be >= 1, got {batch_size}.")
    if mask is None:
        mask = torch.ones_like(input_ids, dtype=torch.bool)
    if mask.shape != input_ids.shape or mask.dtype != torch.bool:
        raise FeaturekitError(f"mask must be a bool tensor shaped like input_ids {tuple(input_ids.shape)}, "
                              f"got {mask.dtype} {tuple(mask.shape)}: build it with data.tokens.token_mask.")
    sites = list(sites)
    n_contexts, context_len = input_ids.shape
    bar = tqdm(total=n_contexts * context_len, unit="tok", unit_scale=True, desc="harvest", disable=not progress)
    try:
        for start in range(0, n_contexts, batch_size):
            ids = input_ids[start:start + batch_size]
            keep = mask[start:start + batch_size]
            if keep.any():
                yield _harvest_batch(model, ids, keep, sites, start, out_device, max_norm_multiple, gradients)
            bar.update(ids.numel())
    finally:
        bar.close()


def _harvest_batch(model: Any, ids: torch.Tensor, keep: torch.Tensor, sites: list[str], offset: int,
                   out_device: str | torch.device, max_norm_multiple: float | None, gradients: bool) -> ActivationBatch:
    """Capture every site (and its gradient) for one batch of contexts and select the kept tokens."""
    if gradients:
        acts, grads = capture_gradients(model, ids, sites)
    else:
        acts, grads = capture_activations(model, ids, sites), {}  # runs under inference_mode
    keep = drop_outliers(keep, list(acts.values()), max_norm_multiple)
    # Selecting outside inference mode yields normal tensors, which consumers may modify in place.
    tensors = {**acts, **{gradient_key(site): g for site, g in grads.items()}}
    selected = {name: t[keep.to(t.device)].to(out_device) for name, t in tensors.items()}
    rows, cols = keep.nonzero(as_tuple=True)
    return ActivationBatch(acts=selected, token_ids=ids[rows, cols].long(),
                           context_idx=(rows + offset).long(), position=cols.long())
