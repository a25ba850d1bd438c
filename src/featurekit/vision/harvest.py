"""Harvest a vision model's activations: one row per kept token of each view, with its token kind.

For each batch of views all sites are captured in one forward pass that stops after the deepest needed
block (`models.hooks.capture_forward`). The rows use the text pipeline's `ActivationBatch` fields:
``context_idx`` = the view's index, ``position`` = the token's index in the sequence (0 = CLS where the
model has one; patch ``(r, c)`` of a g × g grid is ``n_prefix + r·g + c``) and ``token_ids`` = the token
kind (`CLS` = 0 for the prefix tokens, `PATCH` = 1), so the kind travels with every cached row.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm.auto import tqdm

from featurekit.data.batch import ActivationBatch
from featurekit.errors import FeaturekitError
from featurekit.models.hooks import capture_forward
from featurekit.vision.images import Views
from featurekit.vision.models import VisionModel

CLS, PATCH = 0, 1
TOKEN_KINDS = {"all": (CLS, PATCH), "patches": (PATCH,), "cls": (CLS,)}


def token_kinds(vm: VisionModel, size: int) -> torch.Tensor:
    """(T,) int64: the kind of each token of a size × size input (CLS for the prefix tokens, PATCH after)."""
    kinds = torch.full((vm.n_prefix + vm.grid(size) ** 2,), PATCH, dtype=torch.long)
    kinds[:vm.n_prefix] = CLS
    return kinds


def token_mask(vm: VisionModel, size: int, tokens: str) -> torch.Tensor:
    """(T,) bool: the tokens a run keeps (images.tokens: all | patches | cls)."""
    if tokens not in TOKEN_KINDS:
        raise FeaturekitError(f"images.tokens={tokens!r}: use all (CLS and patches), patches or cls")
    if tokens == "cls" and vm.n_prefix == 0:
        raise FeaturekitError(f"images.tokens=cls, but {vm.name} has no CLS token (SigLIP pools its patches): use patches")
    kinds = token_kinds(vm, size)
    return torch.isin(kinds, torch.tensor(TOKEN_KINDS[tokens]))


def capture_pixels(vm: VisionModel, pixels: torch.Tensor, sites: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{site: (B, T, d)}`` for a batch of normalised pixels (B, 3, H, W)."""
    device = next(vm.model.parameters()).device
    dtype = next(vm.model.parameters()).dtype
    return capture_forward(vm.model, sites, lambda: vm.model(pixel_values=pixels.to(device=device, dtype=dtype)))


def harvest_views(vm: VisionModel, views: Views, sites: Sequence[str], *, batch_size: int, tokens: str = "all",
                  progress: bool = True, out_device: str | torch.device = "cpu") -> Iterator[ActivationBatch]:
    """Yield one ActivationBatch per ``batch_size`` views (module docstring)."""
    if batch_size < 1:
        raise FeaturekitError(f"batch_size must be >= 1, got {batch_size}")
    size = views.preprocess.size
    keep = token_mask(vm, size, tokens)
    kinds = token_kinds(vm, size)
    positions = keep.nonzero().squeeze(1)
    bar = tqdm(total=views.n_views, unit="view", desc="harvest", disable=not progress)
    try:
        for start in range(0, views.n_views, batch_size):
            idx = range(start, min(start + batch_size, views.n_views))
            acts = capture_pixels(vm, views.pixels(idx), sites)
            n = len(idx)
            selected = {site: a[:, keep.to(a.device)].reshape(n * len(positions), -1).to(out_device) for site, a in acts.items()}
            yield ActivationBatch(acts=selected, token_ids=kinds[positions].repeat(n),
                                  context_idx=torch.arange(start, start + n).repeat_interleave(len(positions)),
                                  position=positions.repeat(n))
            bar.update(n)
    finally:
        bar.close()
