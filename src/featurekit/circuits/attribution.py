"""Attribution graphs: direct effects between the nodes of a local replacement model (`replacement`).

Nodes, in this order (circuit-tracer's): active features (layer, position, latent) sorted by layer,
position, latent; error nodes (layer, position) layer-major; token embeddings (position); logit targets.

A target's value is linear in the residual stream once features are held fixed:
    feature (L, t, i):   π_i = W_enc[i] · m_L[t] + b_enc[i]          (its pre-activation)
    logit v at the last position:  (W_U[v] − mean_w W_U[w]) · norm_f(x_n)[T−1] + …   (the demeaned logit)
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
              desired_logit_prob: float = 0.95, batch_size: int = 256) -> Graph:
    """The full attribution graph of a local replacement model (every active feature's row computed)."""
    if batch_size < 1:
        raise FeaturekitError(f"batch_size must be >= 1, got {batch_size}")
    start = time.perf_counter()
    feats = rm.active_features()
    logit_ids, logit_probs = logit_targets(rm, tokens, max_n_logits, desired_logit_prob)
    n_f, n_l, T, L = len(feats), len(logit_ids), rm.n_pos, rm.n_layers
    N = n_f + L * T + T + n_l
    adjacency = torch.zeros(N, N)

    enc = [rm.encoder_rows(layer, feats.latent[feats.layer == layer]) for layer in range(L)]
    offset = [int((feats.layer < layer).sum()) for layer in range(L)]
    seeds: list[tuple[int, int, Tensor]] = []      # features in layer order, then the logits
    for i in range(n_f):
        layer = int(feats.layer[i])
        seeds.append((layer, int(feats.pos[i]), enc[layer][i - offset[layer]]))
    W_U_mean = rm.W_U.mean(0)
    seeds += [(L, T - 1, rm.W_U[v] - W_U_mean) for v in logit_ids]
    rows = list(range(n_f)) + list(range(n_f + L * T + T, N))

    # the sources of each (layer, position): their node indices and their written vectors f_i W_dec[i] (n, d)
    groups = []
    for layer in range(L):
        for pos in range(T):
            idx = ((feats.layer == layer) & (feats.pos == pos)).nonzero().flatten()
            if idx.numel():
                groups.append((layer, pos, idx, rm.decoder_rows(layer, feats.latent[idx]) * feats.activation[idx, None]))
    errors, tokens = slice(n_f, n_f + L * T), slice(n_f + L * T, n_f + L * T + T)
    for lo in range(0, len(seeds), batch_size):
        g_x0, g_writes = rm.backward(seeds[lo:lo + batch_size])
        out = rm.zeros(g_x0.shape[0], N)
        for layer, pos, idx, vectors in groups:
            if g_writes[layer] is not None:
                out[:, idx] = g_writes[layer][:, pos] @ vectors.T                     # features: f_i W_dec[i] · gradient
        g_err = torch.stack([torch.zeros_like(g_x0) if g is None else g for g in g_writes], 1)  # (B, L, T, d)
        out[:, errors] = (g_err * torch.stack(rm.errors)).sum(-1).flatten(1)        # error nodes: ε_L[t] · gradient
        out[:, tokens] = (g_x0 * rm.embeddings).sum(-1)                             # tokens: x_0[t] · gradient
        adjacency[rows[lo:lo + batch_size]] = out.float().cpu()
    settings = {"max_n_logits": max_n_logits, "desired_logit_prob": desired_logit_prob, "batch_size": batch_size,
                "max_feature_nodes": n_f, "seconds": round(time.perf_counter() - start, 3)}
    on_cpu = ActiveFeatures(feats.layer.cpu(), feats.pos.cpu(), feats.latent.cpu(), feats.activation.float().cpu())
    return Graph(rm.input_ids.tolist(), on_cpu, L, logit_ids, logit_probs.float().cpu(), adjacency,
                 torch.stack([e.norm(dim=-1) for e in rm.errors]).float().cpu(), settings)


def target_values(rm: LocalReplacement, graph: Graph, writes: Sequence[Tensor], x0: Tensor | None = None) -> Tensor:
    """The value of every target node of `graph` (features' pre-activations, demeaned logits) in the frozen
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
            tc = rm.transcoders[layer]
            parts.append((m * tc.W_enc[feats.latent[idx]]).sum(-1) + tc.b_enc[feats.latent[idx]])
        logits = rm.unembed(final[:, -1])[:, graph.logit_tokens]
        parts.append(logits - rm.unembed(final[:, -1]).mean(-1, keepdim=True))
    return torch.cat(parts, dim=1)


def n_edges(graph: Graph) -> int:
    return int((graph.adjacency != 0).sum())


def describe(graph: Graph) -> str:
    return (f"{graph.n_features} features, {graph.n_errors} error nodes, {graph.n_pos} tokens, {graph.n_logits} logits; "
            f"{n_edges(graph)} non-zero edges ({graph.settings.get('seconds', math.nan)} s)")
