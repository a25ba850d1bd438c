"""What both writers share: a copy of the dictionary with its normalisation folded into the weights (other
libraries run on raw activations), and the error for a method another format cannot hold."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_folder, atomic_write, atomic_write_text
from ..errors import FeaturekitError

#: method → why no other library's format runs it, and what would
WHY_NOT = {
    "mpsae": "MP-SAE encodes by matching pursuit (a greedy loop over residuals), which neither library's encoder runs",
    "itda": "ITDA's codes come from a greedy pursuit over stored activations (atoms), not from an encoder matrix",
    "snmf": "SNMF's codes are solved per token (non-negative least squares), not computed by an encoder",
    "featurechoice": "Feature Choice selects per latent across the batch; its per-token inference threshold has no slot in these formats",
    "mutualchoice": "Mutual Choice selects across the batch; its per-token inference threshold has no slot in these formats",
    "batchabstopk": "batch AbsTopK keeps signed codes above |θ|; SAELens's JumpReLU and sparsify's TopK keep positive codes only",
    "gba": "GBA's grouped bias-adaptation thresholds have no slot in these formats",
    "vsae": "the variational SAE samples its codes; its mean path has no slot in these formats",
    "gsae": "the gradient SAE (g-SAE) selects latents with the LM-loss gradient, which these formats cannot hold",
    "topafa": "TopAFA's per-token adaptive k has no slot in these formats",
}
#: format → methods it holds
HOLDS = {"saelens": ("relu", "topk", "abstopk", "jumprelu", "batchtopk", "matryoshka"),
         "sparsify": ("topk", "transcoder", "skiptranscoder")}


def folded_copy(dictionary: Any) -> Any:
    """A copy with input (and output) scales folded into the weights: encode/decode unchanged, scales 1."""
    d = copy.deepcopy(dictionary).cpu().float()
    d.fold_input_scale()
    return d


def refuse(method: str, fmt: str, why: str | None = None) -> FeaturekitError:
    """The error for a `method` the format `fmt` cannot hold: why, and what would work instead."""
    other = [f for f, methods in HOLDS.items() if f != fmt and method in methods]
    reason = why or WHY_NOT.get(method, f"{fmt} has no architecture that runs featurekit's {method!r} rule")
    instead = (f"export it with `featurekit export {other[0]}` instead" if other else
               f"train one of {list(HOLDS[fmt])} (dictionary.method) to use it in {fmt}, or keep featurekit's own format "
               f"(featurekit.load reads it)")
    return FeaturekitError(f"a {method} dictionary cannot be written in {fmt} format: {reason}; {instead}")


def write_folder(folder: Path, config_name: str, config: dict[str, Any], weights_name: str,
                 tensors: dict[str, torch.Tensor]) -> Path:
    """Write `folder` holding the config (JSON) and the weights (safetensors) as one step: both go into a fresh sibling
    folder that then replaces `folder`, so a reader never finds new weights beside an old config (or half a file)."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    with atomic_folder(folder) as staging:
        atomic_write(staging / weights_name, lambda tmp: save_file(tensors, tmp))
        atomic_write_text(staging / config_name, json.dumps(config, indent=1))
    return folder
