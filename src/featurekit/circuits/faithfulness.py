"""Faithfulness by intervention: does ablating a graph's top features move the target logit as the graph says?

For one prompt and one target token (a logit node of `graph`), a set S of active features is ablated (their
codes set to 0) and the change of the target's demeaned logit (`logit_v − mean_w logit_w`, the graph's logit
node value; for a graph with a contrast token c, the logit difference `logit_v − logit_c`) is predicted from the
graph and measured three ways:

predicted
    direct   −Σ_{s∈S} A[logit, s]: the graph's direct edges; exact when every other feature is held fixed.
    total    the graph's linear response: in units of each feature's own activation, x_s = −1 for s ∈ S and
             x_j = Σ_s (A[j, s] / a_j) x_s for every other active feature j (an active TopK/ReLU feature's code is
             its pre-activation, whose inputs are the edges A[j, ·]), in layer order; Δ = Σ_s A[logit, s] x_s.
             Paths through features are followed; features switching on or off are not.
measured
    frozen       the frozen local replacement model with every other feature held at its clean code (exactly the
                 direct prediction up to float rounding: the check that the edges are the model's).
    replacement  the frozen local replacement model with features live (circuit-tracer's constrained
                 intervention: attention patterns and norm scales frozen, error terms at their clean values,
                 every other code recomputed from its input).
    model        the real model with every MLP replaced by the set (its codes computed from this forward's MLP
                 inputs, S held at 0) plus that layer's clean error term, attention and norms live. Without
                 ablation it gives back the clean logits.

Feature sets: the top k of the pruned graph's features by influence, by direct effect on the target logit and by
total effect (the `total` response of each single feature, largest first), beside a random control of k
features drawn from all active features with a seeded generator.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

import torch
from torch import Tensor

from ..errors import FeaturekitError
from ..models.hooks import capture, replace
from ..models.sites import unwrap
from . import prune
from .attribution import Graph, target_values
from .replacement import LocalReplacement

Key = tuple[int, int, int]   # (layer, position, latent)


def feature_keys(graph: Graph) -> list[Key]:
    f = graph.features
    return list(zip(f.layer.tolist(), f.pos.tolist(), f.latent.tolist()))


def _logit_row(graph: Graph, target: int) -> int:
    if target not in graph.logit_tokens:
        raise FeaturekitError(f"token {target} is not a logit target of this graph (targets {graph.logit_tokens}); "
                              "attribute with tokens=[target] or pick one of them")
    return graph.logit_index(graph.logit_tokens.index(target))


def _response_matrix(graph: Graph) -> Tensor:
    """M[j, s] = A[j, s] / a_j over the feature block: the change of feature j's code, in units of its own
    activation, per unit (own-activation) change of feature s."""
    n = graph.n_features
    act = graph.features.activation.double()
    safe = torch.where(act.abs() > 0, act, torch.ones_like(act))
    return graph.adjacency[:n, :n].double() / safe[:, None]


def predicted_change(graph: Graph, target: int, ablate: Sequence[int]) -> dict[str, float]:
    """The graph's prediction of the target's demeaned-logit change when features `ablate` (indices into
    graph.features) are set to 0: {"direct", "total"} (module docstring)."""
    row = graph.adjacency[_logit_row(graph, target), :graph.n_features].double()
    idx = torch.as_tensor(list(ablate), dtype=torch.long)
    direct = -float(row[idx].sum())
    M = _response_matrix(graph)
    x = torch.zeros(graph.n_features, dtype=torch.float64)
    x[idx] = -1.0
    fixed = torch.zeros(graph.n_features, dtype=torch.bool)
    fixed[idx] = True
    layers = graph.features.layer
    for layer in range(graph.n_layers):
        here = ((layers == layer) & ~fixed).nonzero().flatten()
        if here.numel():
            x[here] = M[here] @ x
    return {"direct": direct, "total": float(row @ x)}


def total_effects(graph: Graph, target: int) -> Tensor:
    """(n_features,) each feature's total effect on the target's demeaned logit when it alone is removed
    (sign flipped: the target change it carries), following the graph's linear response through later features."""
    row = graph.adjacency[_logit_row(graph, target), :graph.n_features].double()
    M = _response_matrix(graph)
    e = row.clone()
    layers = graph.features.layer
    for layer in range(graph.n_layers - 1, -1, -1):
        later = (layers > layer).nonzero().flatten()
        here = (layers == layer).nonzero().flatten()
        if here.numel() and later.numel():
            e[here] = row[here] + e[later] @ M[later][:, here]
    return e


def demeaned(logits: Tensor, target: int, contrast: int | None = None) -> float:
    """logit_target − mean logit at the last position of (T, V) logits; with a `contrast` token c, the logit
    difference logit_target − logit_c (the graph's logit node value either way)."""
    last = logits[-1].double()
    return float(last[target] - (last.mean() if contrast is None else last[contrast]))


def measured_frozen(rm: LocalReplacement, graph: Graph, target: int, ablate: Sequence[int]) -> float:
    """The demeaned target logit change in the frozen linear model, every other feature held at its code."""
    keys = feature_keys(graph)
    active = rm.active_features()
    position = {k: i for i, k in enumerate(zip(active.layer.tolist(), active.pos.tolist(), active.latent.tolist()))}
    scale = rm.zeros(1, len(active)) + 1
    scale[0, [position[keys[i]] for i in ablate]] = 0.0
    k = graph.logit_tokens.index(target)
    row = graph.n_features + k                    # target_values: features first, then the logits
    before = target_values(rm, graph, rm.writes())[0, row]
    after = target_values(rm, graph, rm.writes(feature_scale=scale))[0, row]
    return float(after.double() - before.double())


def measured_replacement(rm: LocalReplacement, target: int, clamps: Mapping[Key, float], contrast: int | None = None) -> float:
    """The demeaned target logit change (logit difference with `contrast`) in the local replacement model with live
    features (frozen attention/norms)."""
    return (demeaned(rm.replacement_logits(clamps=clamps), target, contrast)
            - demeaned(rm.replacement_logits(), target, contrast))


@torch.no_grad()
def spliced_logits(model: Any, rm: LocalReplacement, clamps: Mapping[Key, float] | None = None) -> Tensor:
    """(T, V) logits of the real model on rm's prompt with every MLP of the set replaced by the set's prediction
    from this forward's MLP inputs plus the clean error term, codes in `clamps` held at their values; layers the
    set has no transcoder for (a partial set) keep their clean MLP output (their error node is the whole output).
    Attention and norms are live."""
    tset, clamps = rm.transcoders, dict(clamps or {})
    device = rm.embeddings.device
    codes: dict[int, Tensor] = {}
    covered = set(tset.layers)
    with ExitStack() as stack:
        seen = stack.enter_context(capture(model, *[f"mlp_in.{layer}" for layer in sorted(covered)]))

        def predict(act: Tensor, layer: int) -> Tensor:
            m = seen[f"mlp_in.{layer}"][0].float()
            codes[layer] = tset.encode(layer, m)
            for (at, pos, latent), value in clamps.items():
                if at == layer:
                    codes[layer][pos, latent] = value
            return (tset.prediction(layer, codes, m) + rm.errors[layer])[None]

        for layer in range(rm.n_layers):
            if layer in covered:
                stack.enter_context(replace(model, f"mlp_out.{layer}", lambda act, layer=layer: predict(act, layer)))
            else:
                stack.enter_context(replace(model, f"mlp_out.{layer}", lambda act, layer=layer: rm.mlp_out[layer][None]))
        out = unwrap(model)(input_ids=rm.input_ids[None].to(device), use_cache=False)
    return out.logits[0].float()


def measured_model(model: Any, rm: LocalReplacement, target: int, clamps: Mapping[Key, float],
                   baseline: Tensor | None = None, contrast: int | None = None) -> float:
    base = spliced_logits(model, rm) if baseline is None else baseline
    return demeaned(spliced_logits(model, rm, clamps), target, contrast) - demeaned(base, target, contrast)


def rankings(graph: Graph, pruned: prune.Pruned, target: int) -> dict[str, list[int]]:
    """Feature indices of the pruned graph ordered by influence, by direct effect and by total effect on the
    target (largest first; signed effects, so the features that push towards the target come first)."""
    n = graph.n_features
    kept = pruned.node_mask[:n].nonzero().flatten()
    row = graph.adjacency[_logit_row(graph, target), :n]
    total = total_effects(graph, target)
    order = {"influence": pruned.influence[:n], "direct": row.double(), "total": total}
    return {name: kept[torch.argsort(score[kept], descending=True, stable=True)].tolist() for name, score in order.items()}


def evaluate(model: Any, rm: LocalReplacement, graph: Graph, pruned: prune.Pruned, target: int,
             ks: Sequence[int] = (1, 5, 10, 20), seed: int = 0, real_model: bool = True) -> list[dict[str, Any]]:
    """One row per (feature set, k): the features, the predictions and the measurements (module docstring).
    `real_model=False` skips the spliced real-model measurement."""
    if not ks or any(int(k) < 1 for k in ks):
        raise FeaturekitError(f"ks must be positive feature counts, got {list(ks)}")
    if graph.n_features == 0:
        raise FeaturekitError("the graph has no active features to ablate")
    keys = feature_keys(graph)
    baseline = spliced_logits(model, rm) if real_model else None
    gen = torch.Generator().manual_seed(seed)
    sets = {name: order for name, order in rankings(graph, pruned, target).items()}
    rows = []
    for k in ks:
        chosen = {name: order[:k] for name, order in sets.items()}
        chosen["random"] = torch.randperm(graph.n_features, generator=gen)[:k].tolist()
        for name, idx in chosen.items():
            if not idx:
                continue
            clamps = {keys[i]: 0.0 for i in idx}
            row = {"ranking": name, "k": int(k), "n_ablated": len(idx), "features": [list(keys[i]) for i in idx],
                   **{f"predicted_{p}": v for p, v in predicted_change(graph, target, idx).items()},
                   "measured_frozen": measured_frozen(rm, graph, target, idx),
                   "measured_replacement": measured_replacement(rm, target, clamps, graph.contrast)}
            if real_model:
                row["measured_model"] = measured_model(model, rm, target, clamps, baseline, graph.contrast)
            rows.append(row)
    return rows


def describe(rows: Sequence[Mapping[str, Any]]) -> str:
    cols = ["predicted_direct", "predicted_total", "measured_frozen", "measured_replacement", "measured_model"]
    lines = [f"{'ranking':<10} {'k':>3} " + " ".join(f"{c.replace('predicted_', 'pred_').replace('measured_', 'meas_'):>16}" for c in cols)]
    for r in rows:
        lines.append(f"{r['ranking']:<10} {r['n_ablated']:>3} " + " ".join(f"{r.get(c, float('nan')):>16.4f}" for c in cols))
    return "\n".join(lines)
