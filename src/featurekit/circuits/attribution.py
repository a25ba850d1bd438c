"""Attribution graphs: direct effects between the nodes of a local replacement model (`replacement`).

Nodes, in this order (circuit-tracer's): active features (layer, position, latent) sorted by layer,
position, latent; error nodes (layer, position) layer-major; token embeddings (position); logit targets.

A target's value is linear in the residual stream once features are held fixed:
    feature (L, t, i):   π_i = W_enc[i] · m_L[t] + b_enc[i]          (its pre-activation)
    logit v at the last position:  (W_U[v] − mean_w W_U[w]) · norm_f(x_n)[T−1] + …   (the demeaned logit)
    logit difference v − c:        (W_U[v] − W_U[c]) · norm_f(x_n)[T−1] + …   (with a `contrast` token c, as
                                   circuit-tracer's custom unembedding-direction targets; the mean cancels)
A source writes a vector into the residual stream: a feature f_i W_dec[i] after MLP L at t, an error node
ε_L[t] there, a token its embedding x_0[t]. The edge weight is the direct effect

    A[target, source] = ⟨ source vector , ∂ target / ∂ (residual at the source's write) ⟩

through the frozen linear model (attention patterns and norm denominators fixed, the transcoders' skip
paths kept, every other feature's activation fixed, so no path runs through another feature). Because the
model is linear, the edges into a target add up to its value minus the part that biases make (b_dec, b_V,
b_O, norm biases, b_enc), and a small change δ of a source changes the target by δ·A/a exactly.

The gradients come from batched backward passes (`LocalReplacement.backward`, the model's transposed linear
maps): each row of a batch seeds one target's gradient vector at its own (layer, position), one pass gives
every source's gradient for every row. Targets are in layer order, so a batch of early-layer features only
walks the layers below them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import FeaturekitError
from .influence import influence, normalized
from .replacement import ActiveFeatures, LocalReplacement


@dataclass
class Graph:
    """An attribution graph. `adjacency[target, source]`; rows of error and token nodes are zero."""

    input_ids: list[int]
    features: ActiveFeatures
    n_layers: int
    logit_tokens: list[int]
    logit_probabilities: Tensor          # (n_logits,)
    adjacency: Tensor                    # (N, N)
    error_norms: Tensor                  # (n_layers, T) ‖ε_L[t]‖
    settings: dict[str, Any] = field(default_factory=dict)
    contrast: int | None = None          # c: each logit node is logit(v) − logit(c); None: the demeaned logit

    @property
    def n_pos(self) -> int:
        return len(self.input_ids)

    @property
    def n_features(self) -> int:
        return len(self.features)

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return len(self.logit_tokens)

    def error_index(self, layer: int, pos: int) -> int:
        return self.n_features + layer * self.n_pos + pos

    def token_index(self, pos: int) -> int:
        return self.n_features + self.n_errors + pos

    def logit_index(self, k: int) -> int:
        return self.n_features + self.n_errors + self.n_pos + k


def logit_targets(rm: LocalReplacement, tokens: Sequence[int] | None = None, max_n_logits: int = 10,
                  desired_logit_prob: float = 0.95) -> tuple[list[int], Tensor]:
    """Targets at the last position: the given `tokens`, or the most probable tokens until their cumulative
    probability reaches `desired_logit_prob` (at most `max_n_logits`). Returns (token ids, probabilities)."""
    probs = torch.softmax(rm.clean_logits[-1].double(), -1).float()
    if tokens is not None:
        ids = [int(t) for t in tokens]
        bad = [t for t in ids if not 0 <= t < probs.numel()]
        if not ids or bad:
            raise FeaturekitError(f"logit target token ids {bad or ids} are not in the vocabulary (0..{probs.numel() - 1})")
        return ids, probs[ids]
    if max_n_logits < 1 or not 0 < desired_logit_prob <= 1:
        raise FeaturekitError(f"need max_n_logits >= 1 and 0 < desired_logit_prob <= 1, got {max_n_logits}, {desired_logit_prob}")
    top = torch.topk(probs, min(max_n_logits, probs.numel()))
    n = int(torch.searchsorted(torch.cumsum(top.values, 0), torch.tensor(desired_logit_prob)).item()) + 1
    n = min(n, top.values.numel())
    return top.indices[:n].tolist(), top.values[:n]


def attribute(rm: LocalReplacement, tokens: Sequence[int] | None = None, *, max_n_logits: int = 10,
              desired_logit_prob: float = 0.95, batch_size: int = 256, max_feature_nodes: int | None = None,
              update_interval: int = 4, contrast: int | None = None) -> Graph:
    """The attribution graph of a local replacement model.

    With a `contrast` token c the logit nodes are the logit differences logit(v) − logit(c) for the target `tokens`
    (which must be given, c not among them), each weighted in pruning by p(v) as a logit node is.

    Every active feature is a node unless `max_feature_nodes` caps them: then, as circuit-tracer does, the logit
    rows are computed first and feature rows follow in order of their estimated influence on the output (from
    the rows computed so far, refreshed every `update_interval` batches) until the cap; the features never
    reached are left out of the graph, with their edges (so the edges into a node no longer add up to its value)."""
    if batch_size < 1 or update_interval < 1:
        raise FeaturekitError(f"batch_size and update_interval must be >= 1, got {batch_size}, {update_interval}")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise FeaturekitError(f"max_feature_nodes must be >= 0 (or None for all), got {max_feature_nodes}")
    start = time.perf_counter()
    feats = rm.active_features()
    logit_ids, logit_probs = logit_targets(rm, tokens, max_n_logits, desired_logit_prob)
    if contrast is not None:
        vocab = rm.W_U.shape[0]
        if tokens is None or not 0 <= int(contrast) < vocab or int(contrast) in logit_ids:
            raise FeaturekitError(f"a logit difference needs its target tokens given and a contrast token in the vocabulary "
                                  f"(0..{vocab - 1}) other than them; got targets {tokens}, contrast {contrast}")
        contrast = int(contrast)
    n_f, n_l, T, L = len(feats), len(logit_ids), rm.n_pos, rm.n_layers
    N = n_f + L * T + T + n_l
    adjacency = torch.zeros(N, N)
    rows_of = _RowMaker(rm, feats, logit_ids, N, contrast)

    logit_rows = list(range(N - n_l, N))
    adjacency[logit_rows] = rows_of(logit_rows)
    cap = n_f if max_feature_nodes is None else min(max_feature_nodes, n_f)
    if cap == n_f:
        chosen = list(range(n_f))                      # layer order: early batches walk few layers
        for lo in range(0, n_f, batch_size):
            adjacency[chosen[lo:lo + batch_size]] = rows_of(chosen[lo:lo + batch_size])
    else:
        chosen, remaining = [], torch.ones(n_f, dtype=torch.bool)
        weights = torch.zeros(N)
        weights[logit_rows] = logit_probs.float().cpu()
        order: list[int] = []
        for batch in range(0, cap, batch_size):
            if batch // batch_size % update_interval == 0:
                order = _by_influence(adjacency, weights, logit_rows + chosen, remaining)
            picked = [i for i in order if remaining[i]][:min(batch_size, cap - len(chosen))]
            adjacency[picked] = rows_of(picked)
            remaining[picked] = False
            chosen += picked
        chosen.sort()
        keep = torch.tensor(chosen + list(range(n_f, N)), dtype=torch.long)
        adjacency = adjacency[keep][:, keep]
        sel = torch.tensor(chosen, dtype=torch.long, device=feats.layer.device)
        feats = ActiveFeatures(feats.layer[sel], feats.pos[sel], feats.latent[sel], feats.activation[sel])
    settings = {"max_n_logits": max_n_logits, "desired_logit_prob": desired_logit_prob, "batch_size": batch_size,
                "max_feature_nodes": cap, "active_features": n_f, "seconds": round(time.perf_counter() - start, 3)}
    on_cpu = ActiveFeatures(feats.layer.cpu(), feats.pos.cpu(), feats.latent.cpu(), feats.activation.float().cpu())
    return Graph(rm.input_ids.tolist(), on_cpu, L, logit_ids, logit_probs.float().cpu(), adjacency,
                 torch.stack([e.norm(dim=-1) for e in rm.errors]).float().cpu(), settings, contrast)


def _by_influence(adjacency: Tensor, weights: Tensor, computed: list[int], remaining: Tensor) -> list[int]:
    """Uncomputed features, most influential first, from the rows computed so far: influence flows only through
    computed rows, so it is found on that submatrix and then passed on to every column."""
    rows = torch.tensor(computed, dtype=torch.long)
    a_hat = normalized(adjacency[rows])                           # (R, N)
    within = influence(a_hat[:, rows], weights[rows])             # (R,) influence of the computed nodes
    reach = (within + weights[rows]) @ a_hat                      # (N,) influence of every node
    candidates = remaining.nonzero().flatten()
    return candidates[torch.argsort(reach[:len(remaining)][candidates], descending=True)].tolist()


class _RowMaker:
    """Rows of the adjacency matrix: `self(rows)` → (len(rows), N) direct effects into those target nodes, from one
    batched backward pass (`LocalReplacement.backward`)."""

    def __init__(self, rm: LocalReplacement, feats: ActiveFeatures, logit_ids: list[int], N: int, contrast: int | None = None):
        self.rm, self.feats, self.N = rm, feats, N
        n_f, T, L = len(feats), rm.n_pos, rm.n_layers
        self.n_f = n_f
        self.errors, self.tokens = slice(n_f, n_f + L * T), slice(n_f + L * T, n_f + L * T + T)
        self.W_U_base = rm.W_U.mean(0) if contrast is None else rm.W_U[contrast]   # what each logit node subtracts
        self.logit_ids = logit_ids
        # the sources of each (layer, position): their node indices and the vectors f_i W_dec[i] (n, d) they write
        # into each target layer's MLP output (their own layer; every later one too for a cross-layer transcoder)
        self.groups = []
        for layer in range(L):
            for pos in range(T):
                idx = ((feats.layer == layer) & (feats.pos == pos)).nonzero().flatten()
                if idx.numel():
                    for target in rm.targets(layer):
                        vectors = rm.decoder_rows(layer, feats.latent[idx], target) * feats.activation[idx, None]
                        self.groups.append((target, pos, idx, vectors))

    def seed(self, node: int) -> tuple[int, int, Tensor]:
        """Where target `node`'s gradient starts: (layer, position, vector)."""
        rm, f = self.rm, self.feats
        if node < self.n_f:                     # a feature's pre-activation W_enc[i] · m_L[t]
            layer = int(f.layer[node])
            return layer, int(f.pos[node]), rm.encoder_rows(layer, f.latent[node:node + 1])[0]
        k = node - (self.N - len(self.logit_ids))   # a demeaned logit (or logit difference) at the last position
        return rm.n_layers, rm.n_pos - 1, rm.W_U[self.logit_ids[k]] - self.W_U_base

    def __call__(self, nodes: list[int]) -> Tensor:
        rm = self.rm
        g_x0, g_writes = rm.backward([self.seed(node) for node in nodes])
        out = rm.zeros(len(nodes), self.N)
        for target, pos, idx, vectors in self.groups:
            if g_writes[target] is not None:                                       # features: Σ_targets f_i W_dec[i] · gradient
                out[:, idx] += g_writes[target][:, pos] @ vectors.T
        g_err = torch.stack([torch.zeros_like(g_x0) if g is None else g for g in g_writes], 1)  # (B, L, T, d)
        out[:, self.errors] = (g_err * torch.stack(rm.errors)).sum(-1).flatten(1)  # error nodes: ε_L[t] · gradient
        out[:, self.tokens] = (g_x0 * rm.embeddings).sum(-1)                       # tokens: x_0[t] · gradient
        return out.float().cpu()


def target_values(rm: LocalReplacement, graph: Graph, writes: Sequence[Tensor], x0: Tensor | None = None) -> Tensor:
    """The value of every target node of `graph` (features' pre-activations, demeaned logits or logit differences) in the frozen
    model driven by `writes` (B, T, d per layer) and x0 (B, T, d; default the clean embeddings). (B, n_targets),
    targets in node order (features, then logits)."""
    B = writes[0].shape[0]
    x0 = rm.embeddings.expand(B, -1, -1) if x0 is None else x0
    with torch.no_grad():
        ins, final = rm.frozen_forward(x0, writes)
        feats = graph.features
        parts = []
        for layer in range(graph.n_layers):
            idx = (feats.layer == layer).nonzero().flatten()
            m = ins[layer][:, feats.pos[idx]]                                  # (B, n_L, d)
            latents = feats.latent[idx]
            parts.append((m * rm.encoder_rows(layer, latents)).sum(-1) + rm.transcoders.encoder_bias(layer, latents))
        every = rm.unembed(final[:, -1])
        base = every.mean(-1, keepdim=True) if graph.contrast is None else every[:, [graph.contrast]]
        parts.append(every[:, graph.logit_tokens] - base)
    return torch.cat(parts, dim=1)


def n_edges(graph: Graph) -> int:
    return int((graph.adjacency != 0).sum())


def describe(graph: Graph) -> str:
    return (f"{graph.n_features} features, {graph.n_errors} error nodes, {graph.n_pos} tokens, {graph.n_logits} logits; "
            f"{n_edges(graph)} non-zero edges ({graph.settings.get('seconds', math.nan)} s)")
