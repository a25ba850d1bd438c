"""Input-invariant connections of a transcoder feature (the seed paper's virtual weights): for a feature of a
transcoder run at layer L (mlp_in.L → mlp_out.L), the features of the other served transcoder runs on the same
model whose decoders write most into its encoder (upstream, layers < L) and whose encoders read most of its decoder
(downstream, layers > L):

    V(i → j) = (W_dec,i with its mean removed where the norm centres) · (γ_Lj ⊙ W_enc,j)

in raw units (normalisation scales folded, `TranscoderSet.folded`), through the weight γ of the pre-MLP norm of
the reading layer; the norm's per-token 1/rms (or 1/σ) factor and attention are left out, so V is the effect of a
unit code on the reader's pre-activation per unit of that factor, the same for every input. The model (for γ) is
the run's own, loaded as for "try a text".

Beside them, on request (`mig=True`, the page's button), the input-dependent counterpart: the mean input × gradient
over the feature store's top examples of this feature (`circuits.connections`: the real model, every MLP and
attention live, each served peer transcoder's codes spliced in straight-through), upstream and downstream.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..features.store import FeatureStore
from ..models.sites import blocks
from .live import Models
from .queries import BadRequest, NotFound
from .runs import Run, Runs

TOP = 8
MIG_EXAMPLES = 16   # the store's top examples averaged over for mean input × gradient


def transcoder_layer(run: Run) -> int | None:
    """L for a run whose dictionary reads mlp_in.L and writes mlp_out.L; None for any other run."""
    site, out = run.site, run.output_site
    if not site.startswith("mlp_in.") or not site[7:].isdigit() or out != f"mlp_out.{site[7:]}":
        return None
    return int(site[7:])


def _folded(run: Run) -> Any:
    from ..circuits.sets import TranscoderSet

    layer = transcoder_layer(run)
    return run.cached("folded_transcoder", lambda: TranscoderSet({layer: run.dictionary()}).folded()[layer])


def _norm(model: Any, layer: int) -> tuple[torch.Tensor | None, bool]:
    """(γ of layer `layer`'s pre-MLP norm or None, whether it centres its input)."""
    from ..circuits.frozen import block_parts, check_family

    ln = block_parts(check_family(model), blocks(model)[layer])[2]
    weight = getattr(ln, "weight", None)
    return (None if weight is None else weight.detach().float().cpu()), isinstance(ln, nn.LayerNorm)


def connections(models: Models, runs: Runs, run: Run, feature: int, k: int = TOP, mig: bool = False,
                n_examples: int = MIG_EXAMPLES) -> dict[str, Any]:
    """{"layer", "up": [...], "down": [...], "peers": [run names]}: each row {run, layer, id, v, tokens, explanation};
    with `mig` also "mig_up", "mig_down" (rows with v = mean input × gradient) and "mig_examples" (how many)."""
    layer = transcoder_layer(run)
    if layer is None:
        raise BadRequest(f"{run.name} is a {run.method} dictionary at {run.site}; connections are between transcoders "
                         "(mlp_in.L → mlp_out.L)")
    if not 0 <= feature < run.n_latents:
        raise NotFound(f"{run.name} has features 0 to {run.n_latents - 1}, not {feature}")
    peers = [o for o in runs if o is not run and o.model == run.model and transcoder_layer(o) not in (None, layer)]
    out: dict[str, Any] = {"layer": layer, "up": [], "down": [], "peers": [o.name for o in peers]}
    if not peers:
        return out
    loaded, lock = models.use(run)
    with lock, torch.no_grad():
        me = _folded(run)
        for other in peers:
            theirs, at = _folded(other), transcoder_layer(other)
            if at < layer:  # their decoders into my encoder
                gamma, center = _norm(loaded.model, layer)
                reader = me.W_enc[feature].float() * (1 if gamma is None else gamma)
                writers = theirs.W_dec.float()
                v = (writers - writers.mean(-1, keepdim=True) if center else writers) @ reader
                key = "up"
            else:  # my decoder into their encoders
                gamma, center = _norm(loaded.model, at)
                row = me.W_dec[feature].float()
                row = row - row.mean() if center else row
                v = (theirs.W_enc.float() * (1 if gamma is None else gamma)) @ row
                key = "down"
            values, ids = v.abs().topk(min(k, v.numel()))
            summaries = other.query(FeatureStore.summaries, ids.tolist())
            for i in ids.tolist():
                s = summaries.get(i, {})
                out[key].append({"run": other.name, "layer": at, "id": i, "v": float(v[i]), "tokens": s.get("tokens", []),
                                 "explanation": s.get("explanation")})
    for key in ("up", "down"):
        out[key].sort(key=lambda r: -abs(r["v"]))
        out[key] = out[key][:k]
    if mig:
        out.update(mean_input_gradient(loaded, lock, run, layer, feature, peers, k, n_examples))
    return out


def mean_input_gradient(loaded: Any, lock: Any, run: Run, layer: int, feature: int, peers: list[Run], k: int,
                        n_examples: int) -> dict[str, Any]:
    """{"mig_up", "mig_down", "mig_examples"}: the peers' features ranked by |mean input × gradient| over this
    feature's top examples in the store (module docstring)."""
    from ..circuits import connections as circuit_connections

    examples = run.query(FeatureStore.example_contexts, feature, "top", n_examples)
    out: dict[str, Any] = {"mig_up": [], "mig_down": [], "mig_examples": len(examples)}
    if not examples:
        return out
    by_layer = {transcoder_layer(o): o for o in peers}
    with lock:
        me = _folded(run)
        ups = {at: _folded(o) for at, o in by_layer.items() if at < layer}
        downs = {at: _folded(o) for at, o in by_layer.items() if at > layer}
        values = {}
        if ups:
            found = circuit_connections.upstream(loaded.model, me, layer, feature, ups, examples)
            values.update({("mig_up", at): v for at, v in found.items()})
        if downs:
            found = circuit_connections.downstream(loaded.model, me, layer, feature, downs, examples)
            values.update({("mig_down", at): v for at, v in found.items()})
    for (key, at), v in values.items():
        other = by_layer[at]
        ids = v.abs().topk(min(k, v.numel())).indices.tolist()
        summaries = other.query(FeatureStore.summaries, ids)
        for i in ids:
            s = summaries.get(i, {})
            out[key].append({"run": other.name, "layer": at, "id": i, "v": float(v[i]), "tokens": s.get("tokens", []),
                             "explanation": s.get("explanation")})
    for key in ("mig_up", "mig_down"):
        out[key].sort(key=lambda r: -abs(r["v"]))
        out[key] = out[key][:k]
    return out
