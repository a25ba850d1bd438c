"""Gemma Scope `params.npz` (Lieberum et al. 2024; the layout SAELens's `gemma_2_sae_huggingface_loader` reads):
`W_enc` (d_in, d_sae), `b_enc` (d_sae), `threshold` (d_sae), `W_dec` (d_sae, d_in), `b_dec` (d_in), a JumpReLU SAE
with an uncentred encoder:

    π = x W_enc + b_enc,   f = π · 1[π > θ],   x̂ = f W_dec + b_dec

featurekit's JumpReLU centres its encoder on b_dec, so b_enc ← b_enc + W_encᵀ b_dec (the same π). The file
holds no model or site; the repository's folder names do (`gemma-scope-2b-pt-res/layer_6/width_16k/...`): the
reader takes `layer_N` and `-res`/`-mlp`/`-att` from the path when present, or `site=` from the caller.
Read with `numpy.load(allow_pickle=False)`: an object array (a pickle) is refused.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FeaturekitError
from .common import assemble, centred_bias, need, shape_of

FILE = "params.npz"
FORMAT = "Gemma Scope"
_KIND = {"res": "resid_post", "mlp": "mlp_out", "att": "attn_z"}


def is_gemmascope(path: Path) -> bool:
    return path.suffix == ".npz" and path.is_file() or (path / FILE).is_file()


def guess_site(path: Path) -> str | None:
    """`.../gemma-scope-2b-pt-res/layer_6/...` → resid_post.6 (None when the path does not say)."""
    text = str(path.resolve())
    layer = re.search(r"layer_(\d+)", text)
    kind = re.search(r"-(res|mlp|att)(?:-|/|$)", text)
    return f"{_KIND[kind.group(1)]}.{layer.group(1)}" if layer and kind else None


def read_npz(file: Path) -> dict[str, torch.Tensor]:
    """Every array of an npz file as a float32 tensor; no pickles (a damaged or non-numeric file → FeaturekitError)."""
    try:
        with np.load(file, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
        raise FeaturekitError(f"{file} cannot be read as a numpy .npz of arrays ({err}); the file is damaged or truncated, "
                              f"or holds pickled objects (refused: reading them could run code)") from err
    bad = [k for k, a in arrays.items() if a.dtype.kind not in "fiu"]
    if bad:
        raise FeaturekitError(f"{file}: arrays {bad} are not numeric; not a Gemma Scope parameter file")
    return {k: torch.from_numpy(np.ascontiguousarray(a)).float() for k, a in arrays.items()}


def read(path: Path, device: str | torch.device = "cpu", site: str | None = None, model: str | None = None) -> Any:
    file = path if path.suffix == ".npz" else path / FILE
    t = read_npz(file)
    d_in, d_sae = shape_of(t, "W_enc", 2, file, FORMAT)
    need(t, {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "threshold": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)},
         file, "Gemma Scope JumpReLU SAE")
    W_enc = t["W_enc"].T.contiguous()
    conventions = ["encoder uncentred in the file: b_enc + W_enc^T b_dec"]
    if bool((t["threshold"] < 0).any()):
        raise FeaturekitError(f"{file}: the JumpReLU thresholds hold negative values; Gemma Scope thresholds are ≥ 0, "
                              f"the file is damaged or not a Gemma Scope file")
    state = {"W_enc": W_enc, "b_enc": centred_bias(W_enc, t["b_enc"], t["b_dec"]), "W_dec": t["W_dec"], "b_dec": t["b_dec"],
             "theta": t["threshold"], "input_scale": torch.ones(())}
    source = {"model": model, "site": site or guess_site(file), "d_model": d_in}
    origin = {"format": "gemmascope", "architecture": "jumprelu", "conventions": conventions}
    return assemble("jumprelu", d_in, d_sae, {}, state, file, origin, source, device)
