"""Transcoders spliced into the model: the MLP output of layer L is replaced by the transcoder's
prediction computed from the MLP input of the SAME forward pass (one pre-hook reads `mlp_in.L`, a
forward hook on the same module writes `mlp_out.L`), so with several layers replaced at once each
transcoder reads the input that the earlier replacements produced — the "replacement model" of
Dunefsky et al. 2024 (their `replacement_ctx.py` swaps `blocks[L].mlp`; here plain hooks).

    splice_transcoders(model, transcoders, keep)        context: the listed MLPs replaced
    replace_mlps(model, {layer: transcoder}, keep)       the same for MLP layers, every one at once
    transcoder_splice_eval(model, transcoders, ids, mask) CE clean / spliced / zero-ablated, KL

`transcoders` is `{layer: transcoder}` (site `mlp_in.L` → output site `mlp_out.L`; a loaded
transcoder whose file names other sites is refused) or a list of `(site, output_site, transcoder)`;
the input site must be computed before the output site in the forward pass. `keep` (B, T) bool
restricts the replacement to those positions (None: every position); elsewhere the model's own
MLP output stays.

Scores as `splice.splice_eval` (the README's metric conventions): CE at the kept positions t < T−1,
loss recovered = (CE_zero − CE_spliced) / (CE_zero − CE_clean) where zero-ablation sets the same
MLP outputs to 0 at the same positions, and KL(clean ‖ spliced) per scored position.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import torch

from ..dictionaries import Dictionary
from ..errors import FeaturekitError
from ..models.hooks import capture, replace, transform
from ..models.sites import parse_site
from .splice import score_splice

Transcoders = Mapping[int, Dictionary] | Sequence[tuple[str, str, Dictionary]]


def transcoder_splices(transcoders: Transcoders) -> list[tuple[str, str, Dictionary]]:
    """Normalise `{layer: transcoder}` or `[(site, output_site, transcoder)]` to checked triples."""
    if isinstance(transcoders, Mapping):
        triples = [(f"mlp_in.{int(layer)}", f"mlp_out.{int(layer)}", tc) for layer, tc in transcoders.items()]
    else:
        triples = [(str(parse_site(a)), str(parse_site(b)), tc) for a, b, tc in transcoders]
    if not triples:
        raise FeaturekitError("no transcoder to splice: pass {layer: transcoder} with at least one layer")
    outputs = [out for _, out, _ in triples]
    if len(set(outputs)) != len(outputs):
        raise FeaturekitError(f"two transcoders write the same site ({outputs}); give each output site one transcoder")
    for site, out, tc in triples:
        if not tc.transcodes:
            raise FeaturekitError(f"the {tc.method} dictionary for {out} reconstructs its own site, it is not a transcoder; "
                                  "splice it with evaluate.splice.splice_eval instead")
        source = (getattr(tc, "metadata", None) or {}).get("source", {})
        if source.get("site") and (source.get("site"), source.get("output_site")) != (site, out):
            raise FeaturekitError(f"the transcoder given for {site} → {out} was trained on {source.get('site')} → "
                                  f"{source.get('output_site')}; pass it under its own layer")
    return triples


def _predict_at(act: torch.Tensor, x_in: torch.Tensor, keep: torch.Tensor | None, tc: Dictionary) -> torch.Tensor:
    """`act` with its kept positions replaced by the transcoder's prediction from `x_in`."""
    if keep is None:
        return tc.reconstruct(x_in.reshape(-1, x_in.shape[-1]).float()).reshape(act.shape)
    if keep.shape != act.shape[:-1]:
        raise FeaturekitError(f"keep mask has shape {tuple(keep.shape)} but the activations are {tuple(act.shape[:-1])}: "
                              "pass a (B, T) mask for the ids of this forward pass")
    out = act.clone()
    out[keep] = tc.reconstruct(x_in[keep].float()).to(act.dtype)
    return out


@contextmanager
def splice_transcoders(model: torch.nn.Module, transcoders: Transcoders, keep: torch.Tensor | None = None) -> Iterator[None]:
    """Within the context, each output site is replaced by its transcoder's prediction from the input
    site captured earlier in the same forward pass (at the `keep` positions)."""
    triples = transcoder_splices(transcoders)
    with ExitStack() as stack:
        seen = stack.enter_context(capture(model, *{site for site, _, _ in triples}))

        def predict(act: torch.Tensor, site: str, tc: Dictionary) -> torch.Tensor:
            if site not in seen:
                raise FeaturekitError(f"{site} was not computed before its output site in this forward pass; "
                                      "a transcoder must read a site that comes earlier than the one it writes")
            return _predict_at(act, seen[site], keep, tc)

        for site, out, tc in triples:
            stack.enter_context(replace(model, out, lambda act, site=site, tc=tc: predict(act, site, tc)))
        yield


def replace_mlps(model: torch.nn.Module, transcoders: Mapping[int, Dictionary], keep: torch.Tensor | None = None):
    """Context: the MLP of every layer in `transcoders` replaced by its transcoder (mlp_in.L → mlp_out.L), all at once."""
    return splice_transcoders(model, dict(transcoders), keep)


@torch.no_grad()
def transcoder_splice_eval(
    model: torch.nn.Module,
    transcoders: Transcoders,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    batch_contexts: int = 16,
    progress: bool = True,
    max_norm_multiple: float | None = None,
) -> dict:
    """Clean, spliced (all listed MLPs replaced) and zero-ablated (the same MLP outputs set to 0) CE,
    loss recovered and KL(clean ‖ spliced) on `input_ids`, at the positions `mask` keeps (minus
    tokens whose norm at an input or output site exceeds `max_norm_multiple` × the batch median)."""
    triples = transcoder_splices(transcoders)
    read = sorted({site for site, _, _ in triples} | {out for _, out, _ in triples})

    def zero(keep: torch.Tensor):
        return transform(model, {out: (lambda act: act.masked_fill(keep[..., None], 0.0)) for _, out, _ in triples})

    out = score_splice(model, input_ids, mask, read, spliced=lambda keep: splice_transcoders(model, triples, keep), ablated=zero,
                       batch_contexts=batch_contexts, progress=progress, max_norm_multiple=max_norm_multiple,
                       desc="transcoder splice eval")
    out["spliced_sites"] = [f"{site} -> {out_site}" for site, out_site, _ in triples]
    return out
