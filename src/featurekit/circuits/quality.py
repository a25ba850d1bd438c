"""How well a transcoder set stands in for the model's MLPs: every MLP of the set's layers replaced at once.

    replacement_quality(model, tset, input_ids, mask)  → {ce_clean, ce_spliced, ce_zero_ablated, loss_recovered,
                                                          kl_clean_spliced, delta_ce, splice_tokens, kind, layers, ...}

In the spliced forward each layer's MLP output is the set's prediction from the MLP inputs of the same
forward (which the earlier replacements already changed): per-layer transcoders through
`evaluate.transcoders.splice_transcoders`; a cross-layer transcoder by `splice_clt`, which encodes layer L's
input when its MLP output is due and writes Σ_{l ≤ L} f_l W_dec,l→L + b_dec,L there. No error terms: this is
the replacement model itself, not the exact local one of `replacement`. The zero-ablation baseline sets the
same MLP outputs to 0; loss recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean); KL(clean ‖ spliced)
per scored position (`evaluate.splice.score_splice`, the README's metric conventions). Beside them, each
layer's FVU of its MLP output predicted from the clean forward's inputs (`layer_fvu`), on the same kept tokens
(not minus norm outliers).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor

from ..evaluate.splice import score_splice
from ..evaluate.transcoders import transcoder_splice_eval
from ..models.hooks import capture, replace, transform
from ..models.sites import unwrap
from .sets import AnySet, CrossLayerSet


@contextmanager
def splice_clt(model: Any, cset: CrossLayerSet, keep: Tensor | None = None) -> Iterator[None]:
    """Within the context, mlp_out.L of every layer of the CLT is its prediction from this forward's MLP inputs
    (at the `keep` (B, T) positions; elsewhere the model's own MLP output stays)."""
    codes: dict[int, Tensor] = {}
    with ExitStack() as stack:
        seen = stack.enter_context(capture(model, *[f"mlp_in.{layer}" for layer in cset.layers]))

        def predict(act: Tensor, layer: int) -> Tensor:
            m = seen[f"mlp_in.{layer}"].float()
            codes[layer] = cset.encode(layer, m)           # layers come in order: earlier codes are this forward's
            y = cset.prediction(layer, codes, m).to(act.dtype)
            return y if keep is None else torch.where(keep[..., None], y, act)

        for layer in cset.layers:
            stack.enter_context(replace(model, f"mlp_out.{layer}", lambda act, layer=layer: predict(act, layer)))
        yield


@torch.no_grad()
def layer_fvu(model: Any, tset: AnySet, input_ids: Tensor, mask: Tensor, batch_contexts: int = 8) -> dict[str, float]:
    """Each layer's FVU of mlp_out.L predicted from the CLEAN forward's MLP inputs (no replacement upstream):
    Σ‖y − ŷ‖² / Σ‖y − ȳ‖² over the kept tokens, per layer of the set."""
    sites = [f"{kind}.{layer}" for layer in tset.layers for kind in ("mlp_in", "mlp_out")]
    device = next(unwrap(model).parameters()).device
    sums = {layer: torch.zeros(3, dtype=torch.float64) for layer in tset.layers}  # Σ‖y−ŷ‖², Σ‖y‖², n
    means = {layer: 0.0 for layer in tset.layers}
    for start in range(0, len(input_ids), batch_contexts):
        keep = mask[start:start + batch_contexts].to(device)
        if not keep.any():
            continue
        with capture(model, *sites) as seen:
            unwrap(model)(input_ids=input_ids[start:start + batch_contexts].to(device), use_cache=False)
        codes: dict[int, Tensor] = {}
        for layer in tset.layers:
            m, y = seen[f"mlp_in.{layer}"][keep].float(), seen[f"mlp_out.{layer}"][keep].float()
            codes[layer] = tset.encode(layer, m)
            err = (y - tset.prediction(layer, codes, m)).double()
            sums[layer] += torch.stack([err.pow(2).sum(), y.double().pow(2).sum(), torch.tensor(float(len(y)))])
            means[layer] = means[layer] + y.double().sum(0)
    out = {}
    for layer, (sse, sq, n) in sums.items():
        total = float(sq) - float((means[layer] ** 2).sum()) / float(n)   # Σ‖y − ȳ‖²
        out[str(layer)] = float(sse) / total if total > 0 else float("nan")
    return out


@torch.no_grad()
def replacement_quality(model: Any, tset: AnySet, input_ids: Tensor, mask: Tensor, batch_contexts: int = 8,
                        progress: bool = True) -> dict:
    """CE / KL / loss recovered with every MLP of the set's layers replaced at once (module docstring)."""
    hf = unwrap(model)
    dtype = next(hf.parameters()).dtype
    tset = tset.folded().to(next(hf.parameters()).device)
    if isinstance(tset, CrossLayerSet):
        outs = [f"mlp_out.{layer}" for layer in tset.layers]

        def zero(keep: Tensor):
            return transform(model, {site: (lambda act: act.masked_fill(keep[..., None], 0.0)) for site in outs})

        result = score_splice(model, input_ids, mask, [f"mlp_in.{layer}" for layer in tset.layers] + outs,
                              spliced=lambda keep: splice_clt(model, tset, keep), ablated=zero,
                              batch_contexts=batch_contexts, progress=progress, desc="CLT replacement")
        latents = tset.clt.n_latents
    else:
        result = transcoder_splice_eval(model, dict(tset.transcoders), input_ids, mask, batch_contexts=batch_contexts,
                                        progress=progress)
        result.pop("spliced_sites", None)
        latents = sum(tc.n_latents for tc in tset.transcoders.values())
    fvu = layer_fvu(model, tset, input_ids, mask, batch_contexts)
    return {"kind": tset.kind, "layers": tset.layers, "total_latents": latents,
            "latents_per_layer": {str(layer): tset.width(layer) for layer in tset.layers}, "model_dtype": str(dtype), **result,
            "fvu_per_layer_clean_inputs": fvu}


def describe(result: dict) -> str:
    return (f"{result['kind']} over {len(result['layers'])} layers ({result['total_latents']} latents), every MLP replaced "
            f"at once on {result['splice_tokens']} tokens: CE clean {result['ce_clean']:.4f}, replaced {result['ce_spliced']:.4f}, "
            f"zero-ablated {result['ce_zero_ablated']:.4f}; loss recovered {result['loss_recovered']:.3f}, "
            f"KL(clean || replaced) {result['kl_clean_spliced']:.4f}")
