"""EleutherAI sparsify folders: one folder per hookpoint holding `cfg.json` (the `SparseCoderConfig` fields and
`d_in`) and `sae.safetensors` (`encoder.weight` (F, d_in), `encoder.bias`, `W_dec` (F, d_in), `b_dec`, and
`W_skip` (d_in, d_in) with a skip connection); sparsify `sparse_coder.py`.

sparsify encodes ReLU(x' Wᵀ + b) then keeps the top k (featurekit's `topk`: the same codes), x' = x − b_dec for
an SAE and x for a transcoder, and decodes Σ f W_dec + b_dec (+ x W_skipᵀ). So an SAE maps onto featurekit's
topk, a transcoder onto transcoder / skiptranscoder, with the same tensors. `multi_topk` is a training loss only
(inference keeps k); `normalize_decoder` a training constraint. Refused: `activation: groupmax`, an SAE (not a
transcoder) with a skip connection, and signed codes (`signed: true` in newer sparsify), which featurekit's
TopK methods do not hold in that form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import FeaturekitError
from .common import assemble, need, read_config, read_safetensors, shape_of
from .hooks import hookpoint_from_site, sites_from_hookpoint

CFG = "cfg.json"
WEIGHTS = "sae.safetensors"
FORMAT = "sparsify"


def is_sparsify(path: Path) -> bool:
    return (path / CFG).is_file() and (path / WEIGHTS).is_file()


def read(path: Path, device: str | torch.device = "cpu", model: str | None = None) -> Any:
    """The featurekit dictionary a sparsify hookpoint folder maps onto (module docstring)."""
    cfg = read_config(path / CFG, FORMAT)
    weights = path / WEIGHTS
    if cfg.get("activation", "topk") != "topk":
        raise FeaturekitError(f"{path / CFG}: sparsify activation {cfg.get('activation')!r} does not map onto a featurekit "
                              f"method (featurekit reads sparsify's topk coders)")
    if cfg.get("signed"):
        raise FeaturekitError(f"{path / CFG}: signed sparsify coders do not map onto a featurekit method")
    transcode, skip = bool(cfg.get("transcode")), bool(cfg.get("skip_connection"))
    if skip and not transcode:
        raise FeaturekitError(f"{path / CFG}: a sparsify SAE with a skip connection does not map onto a featurekit method "
                              f"(featurekit's skip connection belongs to the skip transcoder)")
    t = read_safetensors(weights, FORMAT)
    n, d_in = shape_of(t, "encoder.weight", 2, weights, FORMAT)
    if cfg.get("d_in", d_in) != d_in:
        raise FeaturekitError(f"{weights}: encoder.weight has {d_in} columns but {path / CFG} says d_in={cfg['d_in']}; the "
                              f"two files do not belong together")
    k = cfg.get("k")
    if type(k) is not int or not 0 < k <= n:
        raise FeaturekitError(f"{path / CFG}: k must be an integer in [1, {n}], got {k!r}; the file is damaged")
    shapes = {"encoder.weight": (n, d_in), "encoder.bias": (n,), "W_dec": (n, d_in), "b_dec": (d_in,),
              **({"W_skip": (d_in, d_in)} if skip else {})}
    need(t, shapes, weights, f"sparsify {'skip transcoder' if skip else 'transcoder' if transcode else 'SAE'}")
    hookpoint = path.name
    site, output_site = sites_from_hookpoint(hookpoint, transcode)
    source = {"model": model, "site": site, "output_site": output_site, "hookpoint": hookpoint, "d_model": d_in}
    origin = {"format": FORMAT, "architecture": "skip transcoder" if skip else "transcoder" if transcode else "sae",
              "multi_topk": bool(cfg.get("multi_topk")), "conventions": ["multi_topk is a training loss: inference keeps k"]}
    state = {"W_enc": t["encoder.weight"], "b_enc": t["encoder.bias"], "W_dec": t["W_dec"], "b_dec": t["b_dec"],
             "input_scale": torch.ones(())}
    if not transcode:
        return assemble("topk", d_in, n, {"k": k}, state, path, origin, source, device)
    state["output_scale"] = torch.ones(())
    if skip:
        state["W_skip"] = t["W_skip"]
    return assemble("skiptranscoder" if skip else "transcoder", d_in, n, {"k": k, "d_out": d_in}, state, path, origin,
                    source, device, d_out=d_in)


def export(dictionary: Any, out: Path) -> Path:
    """Write `dictionary` as sparsify's folder layout: `out/HOOKPOINT/{cfg.json, sae.safetensors}` (hookpoint from the
    dictionary's site, Llama-style module names; `out/sae` when the site has none), the hookpoint folder replaced in one
    step. Returns the hookpoint folder."""
    from .writing import folded_copy, refuse, write_folder

    method = dictionary.method
    if method not in ("topk", "transcoder", "skiptranscoder") or getattr(dictionary, "selection", "exact") != "exact":
        why = "its statistical selection is not sparsify's exact top-k" if method == "topk" else None
        raise refuse(method, FORMAT, why)
    d = folded_copy(dictionary)
    transcode = method != "topk"
    if transcode and d.d_out != d.d_in:
        raise refuse(method, FORMAT, f"sparsify transcoders predict an output as wide as their input (d_in {d.d_in}, "
                                     f"here d_out {d.d_out})")
    source = (getattr(dictionary, "metadata", {}) or {}).get("source", {})
    hookpoint = hookpoint_from_site(source.get("site"), source.get("output_site") if transcode else None) or "sae"
    cfg = {"activation": "topk", "expansion_factor": max(1, d.n_latents // d.d_in), "normalize_decoder": not transcode,
           "num_latents": d.n_latents, "k": d.k, "multi_topk": False, "skip_connection": method == "skiptranscoder",
           "transcode": transcode, "d_in": d.d_in}
    tensors = {"encoder.weight": d.W_enc, "encoder.bias": d.b_enc, "W_dec": d.W_dec, "b_dec": d.b_dec}
    if method == "skiptranscoder":
        tensors["W_skip"] = d.W_skip
    return write_folder(out / hookpoint, CFG, cfg, WEIGHTS, tensors)
