"""SAELens folders: `cfg.json` + `sae_weights.safetensors` (SAELens `saes/sae.py`, `save_model` /
`save_inference_model`), read onto featurekit's methods and written from them.

Tensors: `W_enc` (d_in, d_sae), `b_enc` (d_sae), `W_dec` (d_sae, d_in), `b_dec` (d_in), `threshold` (d_sae,
JumpReLU). SAELens encodes π = (x − b_dec·[apply_b_dec_to_input]) W_enc + b_enc, then the architecture's
activation, and decodes f W_dec + b_dec. featurekit's methods fix the centring (ReLU: none; the others: by b_dec),
so the reader moves b_dec into b_enc where the two differ (`common.centred_bias`). Other conventions:

* `rescale_acts_by_decoder_norm` (TopK, AbsTopK): SAELens multiplies π by ‖W_dec,j‖ and divides the codes by it
  before decoding; folded exactly into W_enc, b_enc and W_dec (rows of unit norm), as SAELens's own fold.
* BatchTopK and Matryoshka are saved by SAELens as `jumprelu` with one threshold repeated per latent and
  `metadata.training_architecture` naming the trainer; such a file loads as featurekit's batchtopk / matryoshka
  (global threshold θ; k and the widths from `training_architecture_details`); any other JumpReLU as jumprelu.
* JumpReLU: SAELens computes ReLU(π)·1[π > θ], featurekit π·1[π > θ]; equal when θ ≥ 0, and a negative θ
  is replaced by 0, which gives ReLU(π)·1[π > θ] exactly.
* `normalize_activations`: "none" and "expected_average_only_in" (SAELens applies nothing at inference; the
  factor is folded into the weights at the end of training) load; the per-token rules ("constant_norm_rescale",
  "layer_norm") and "covariance_whitening" are refused (no featurekit method runs them).
* Transcoders (SAELens's are ReLU or JumpReLU; featurekit's are TopK), gated, matching-pursuit and temporal
  SAEs do not map and are refused, naming the architecture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import FeaturekitError
from .common import assemble, centred_bias, need, read_config, read_safetensors, shape_of, uncentred_bias
from .hooks import hook_from_site, site_from_hook

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
FORMAT = "saelens"
_NOT_MAPPED = {
    "transcoder": "SAELens transcoders use a ReLU activation; featurekit's transcoders are TopK (sparsify's format holds those)",
    "skip_transcoder": "SAELens skip transcoders use a ReLU activation; featurekit's are TopK (sparsify's format holds those)",
    "jumprelu_transcoder": "featurekit's transcoders are TopK, not JumpReLU",
    "jumprelu_skip_transcoder": "featurekit's transcoders are TopK, not JumpReLU",
    "gated": "featurekit has no gated SAE",
    "matching_pursuit": "SAELens's matching-pursuit SAE runs a residual pursuit featurekit's MP-SAE file does not state "
                        "(train an mpsae in featurekit)",
    "temporal": "featurekit has no temporal SAE",
}


def is_saelens(path: Path) -> bool:
    return (path / CFG).is_file() and (path / WEIGHTS).is_file()


def read(path: Path, device: str | torch.device = "cpu") -> Any:
    """The featurekit dictionary a SAELens folder maps onto (module docstring)."""
    cfg = read_config(path / CFG, FORMAT)
    weights = path / WEIGHTS
    arch = cfg.get("architecture", "standard")  # SAELens before v6 wrote no architecture: standard (ReLU) SAEs
    old_topk = arch == "standard" and cfg.get("activation_fn_str") == "topk"  # SAELens < 6 kept TopK SAEs as "standard"
    if old_topk:
        arch = "topk"
        cfg = {**cfg, "k": (cfg.get("activation_fn_kwargs") or {}).get("k")}
        if type(cfg["k"]) is not int:
            raise FeaturekitError(f"{path / CFG}: a TopK SAE (activation_fn_str=topk) without an integer "
                                  f"activation_fn_kwargs.k; the file is damaged")
    elif arch == "standard" and cfg.get("activation_fn_str", "relu") != "relu":
        raise FeaturekitError(f"{path / CFG}: activation_fn_str={cfg['activation_fn_str']!r} does not map onto a featurekit "
                              f"method (featurekit reads relu and topk)")
    if cfg.get("finetuning_scaling_factor"):
        raise FeaturekitError(f"{path / CFG}: finetuning_scaling_factor=true scales the codes by a learned vector featurekit's "
                              f"methods do not hold; fold it into W_dec in SAELens first")
    if arch in _NOT_MAPPED:
        raise FeaturekitError(f"{path / CFG}: SAELens architecture {arch!r} does not map onto a featurekit method: "
                              f"{_NOT_MAPPED[arch]}")
    if arch not in ("standard", "jumprelu", "topk", "abstopk"):
        raise FeaturekitError(f"{path / CFG}: unknown SAELens architecture {arch!r}; featurekit reads standard, jumprelu "
                              f"(also SAELens's BatchTopK and Matryoshka files), topk and abstopk")
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", "expected_average_only_in", None):
        raise FeaturekitError(f"{path / CFG}: normalize_activations={norm!r} rescales every token at run time, which no "
                              f"featurekit method does; fold it into the weights in SAELens first, or use a SAE trained "
                              f"without it")
    t = read_safetensors(weights, FORMAT)
    d_in, d_sae = shape_of(t, "W_enc", 2, weights, FORMAT)
    for key, want in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and cfg[key] != want:
            raise FeaturekitError(f"{weights}: W_enc has shape ({d_in}, {d_sae}) but {path / CFG} says {key}={cfg[key]}; the "
                                  f"two files do not belong together")
    shapes = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        shapes["threshold"] = (d_sae,)
    need(t, shapes, weights, f"SAELens {arch} SAE")
    W_enc, b_enc, W_dec, b_dec = t["W_enc"].T.contiguous(), t["b_enc"], t["W_dec"], t["b_dec"]
    centred = bool(cfg.get("apply_b_dec_to_input", True))
    applied = [f"apply_b_dec_to_input={centred}"]
    if arch in ("topk", "abstopk") and cfg.get("rescale_acts_by_decoder_norm"):
        norms = W_dec.norm(dim=1).clamp_min(1e-8)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
        applied.append("rescale_acts_by_decoder_norm folded (unit-norm decoder rows)")
    meta = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else cfg  # SAELens < 6 kept them at the top level
    hook, head = meta.get("hook_name"), meta.get("hook_head_index")
    site = site_from_hook(hook) if head is None else None  # one head's slice of a site is not a featurekit site
    source = {"model": meta.get("model_name"), "site": site, "hook_name": hook, "hook_head_index": head, "d_model": d_in}
    origin = {"format": FORMAT, "architecture": arch, "sae_lens_version": meta.get("sae_lens_version"),
              "training_architecture": meta.get("training_architecture"), "normalization": norm or "none"}
    details = meta.get("training_architecture_details") or {}
    if arch == "standard":  # featurekit's ReLU SAE does not centre
        b_enc = uncentred_bias(W_enc, b_enc, b_dec) if centred else b_enc
        method, hyper = "relu", {k: details[k] for k in ("l1_coefficient",) if isinstance(details.get(k), (int, float))}
        state = {}
    else:
        b_enc = b_enc if centred else centred_bias(W_enc, b_enc, b_dec)
        method, hyper, state = _method(arch, cfg, meta, details, t, applied)
    origin["conventions"] = applied
    state = {"W_enc": W_enc, "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec, "input_scale": torch.ones(()), **state}
    return assemble(method, d_in, d_sae, hyper, state, path, origin, source, device)


def _method(arch: str, cfg: dict, meta: dict, details: dict, t: dict, applied: list[str]) -> tuple[str, dict, dict]:
    """(featurekit method, hyperparams, its extra state) of a centred SAELens architecture."""
    if arch in ("topk", "abstopk"):
        return arch, {"k": int(cfg.get("k", details.get("k", 100)))}, {}
    threshold = t["threshold"]
    trained = meta.get("training_architecture")
    k = details.get("k")
    if trained in ("batchtopk", "matryoshka_batchtopk") and isinstance(k, int) and bool((threshold == threshold[0]).all()):
        decay = 1 - float(details.get("topk_threshold_lr", 0.01))
        hyper: dict[str, Any] = {"k": k, "threshold_decay": decay}
        if trained == "matryoshka_batchtopk":
            hyper["prefixes"] = [int(w) for w in details.get("matryoshka_widths") or [threshold.shape[0]]]
        applied.append("one threshold repeated per latent: the global BatchTopK threshold")
        theta = threshold[0].clamp_min(0)
        state = {"theta": theta, "theta_updates": torch.ones((), dtype=torch.long)}
        return ("matryoshka" if trained == "matryoshka_batchtopk" else "batchtopk"), hyper, state
    if bool((threshold < 0).any()):
        applied.append("negative thresholds replaced by 0 (same codes: SAELens applies ReLU first)")
    return "jumprelu", {}, {"theta": threshold.clamp_min(0)}


# -- writing -------------------------------------------------------------------------------------------------
def export(dictionary: Any, out: Path) -> Path:
    """Write `dictionary` as a SAELens inference folder `out` (cfg.json + sae_weights.safetensors, replacing `out` in
    one step); a method SAELens cannot run raises FeaturekitError saying why and what would work."""
    from .writing import folded_copy, refuse, write_folder

    method = dictionary.method
    d = folded_copy(dictionary)
    meta = getattr(dictionary, "metadata", {}) or {}
    source = meta.get("source", {})
    W_enc, b_enc, W_dec, b_dec = d.W_enc.detach(), d.b_enc.detach(), d.W_dec.detach(), d.b_dec.detach()
    cfg: dict[str, Any] = {"d_in": d.d_in, "d_sae": d.n_latents, "dtype": "float32", "device": "cpu",
                           "apply_b_dec_to_input": True, "normalize_activations": "none",
                           "reshape_activations": "none"}
    tensors = {}
    details: dict[str, Any] = {}
    training_arch = None
    if method == "relu":
        cfg.update(architecture="standard", apply_b_dec_to_input=False)
    elif method in ("topk", "abstopk") and getattr(d, "selection", "exact") == "exact":
        cfg.update(architecture=method, k=d.k, rescale_acts_by_decoder_norm=False)
    elif method == "jumprelu":
        cfg["architecture"] = "jumprelu"
        tensors["threshold"] = d.theta.detach().clamp_min(0)
    elif method in ("batchtopk", "matryoshka"):
        cfg["architecture"] = "jumprelu"
        tensors["threshold"] = torch.full((d.n_latents,), float(d.theta.clamp_min(0)))
        training_arch = "batchtopk" if method == "batchtopk" else "matryoshka_batchtopk"
        details = {"k": d.k, "topk_threshold_lr": 1 - d.threshold_decay,
                   **({"matryoshka_widths": list(d.prefixes)} if method == "matryoshka" else {})}
    else:
        raise refuse(method, "saelens")
    hook = hook_from_site(source.get("site"))
    if source.get("site", "").startswith("attn_z."):
        cfg["reshape_activations"] = "hook_z"
    cfg["metadata"] = {"model_name": source.get("model"), "hook_name": hook, "hook_head_index": None,
                       "featurekit_site": source.get("site"), "exported_by": "featurekit",
                       **({"training_architecture": training_arch, "training_architecture_details": details}
                          if training_arch else {})}
    tensors.update({"W_enc": W_enc.T.contiguous(), "b_enc": b_enc, "W_dec": W_dec, "b_dec": b_dec})
    return write_folder(out, CFG, cfg, WEIGHTS, tensors)
