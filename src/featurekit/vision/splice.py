"""The vision splice metric: how much the model's own output moves when a site is replaced by its reconstruction.

Per batch of views, three forwards to the model's final token states (``last_hidden_state``: after the
final LayerNorm for DINOv2 and ViT; CLIP/SigLIP's before their post-LayerNorm):
clean, spliced (the site's activation at the kept tokens replaced by the dictionary's reconstruction) and
zero-ablated (the same tokens set to zero, the reference for "as bad as no information").

    cls_cosine          mean over views of cos(e_clean, e_spliced), e = the final CLS token (a model
                        without CLS, SigLIP: the mean of the final patch tokens)
    cls_cosine_zero     the same with the site zero-ablated
    patch_rel_change    mean over views of ‖P_spliced − P_clean‖_F / ‖P_clean‖_F, P = the final patch tokens (n_patches × d)
    patch_rel_change_zero  the same with the site zero-ablated

1 and 0 are perfect for cosine and relative change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from featurekit.dictionaries import Dictionary
from featurekit.errors import FeaturekitError
from featurekit.models.hooks import replace
from featurekit.vision.images import Views
from featurekit.vision.models import VisionModel


def _embedding(vm: VisionModel, final: torch.Tensor) -> torch.Tensor:
    return final[:, 0] if vm.n_prefix else final[:, vm.n_prefix:].mean(1)


def _splice_at(act: torch.Tensor, keep: torch.Tensor, fn) -> torch.Tensor:
    out = act.clone()
    out[:, keep] = fn(act[:, keep].float()).to(act.dtype)
    return out


@torch.no_grad()
def vision_splice_eval(vm: VisionModel, dictionary: Dictionary, site: str, views: Views, keep: torch.Tensor,
                       batch_size: int = 16, progress: bool = True) -> dict:
    """The metrics of the module docstring over ``views``; ``keep`` (T,) bool: the tokens spliced."""
    if views.n_views == 0:
        raise FeaturekitError("the vision splice needs at least one view; raise eval.tokens")
    sums = {"cls_cosine": 0.0, "cls_cosine_zero": 0.0, "patch_rel_change": 0.0, "patch_rel_change_zero": 0.0}
    for start in tqdm(range(0, views.n_views, batch_size), desc="vision splice", disable=not progress):
        pixels = views.pixels(range(start, min(start + batch_size, views.n_views)))
        clean = vm.forward(pixels).float()
        for suffix, fn in (("", dictionary.reconstruct), ("_zero", torch.zeros_like)):
            with replace(vm.model, site, lambda act, fn=fn: _splice_at(act, keep.to(act.device), fn)):
                out = vm.forward(pixels).float()
            sums["cls_cosine" + suffix] += float(F.cosine_similarity(_embedding(vm, clean), _embedding(vm, out), dim=-1).sum())
            p_clean, p_out = clean[:, vm.n_prefix:], out[:, vm.n_prefix:]
            sums["patch_rel_change" + suffix] += float(((p_out - p_clean).flatten(1).norm(dim=1) / p_clean.flatten(1).norm(dim=1)).sum())
    result = {k: v / views.n_views for k, v in sums.items()}
    result["splice_views"] = views.n_views
    return result
