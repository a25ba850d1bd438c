"""Influence, pruning and the graph's quality scores (the rules of circuit-tracer's `graph.py`).

With Â = |A| with each row normalised to sum 1 (a target's inputs as shares) and w the logit targets'
probabilities (zero elsewhere), the influence of node s on the output is

    influence = w Â + w Â² + w Â³ + …        (the graph is acyclic, so the series ends after ≤ depth terms)

Pruning keeps the nodes that carry `node_threshold` of the total influence (tokens and logits always),
then, in that subgraph, the edges carrying `edge_threshold` of the edge scores Â[t, s]·(influence(t) + w(t)),
and then repeatedly drops features and error nodes left without outgoing edges (and features without
incoming ones).

Scores:
    replacement = influence reaching tokens / influence reaching tokens or error nodes
                  (1: every path from the output ends at an embedding through features only)
    completeness = Σ_t (influence(t) + w(t)) · (share of t's input not from error nodes) / Σ_t (influence(t) + w(t))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import FeaturekitError
from .attribution import Graph
from .influence import influence, normalized


def logit_weights(graph: Graph) -> Tensor:
    w = torch.zeros(graph.adjacency.shape[0])
    w[graph.logit_index(0):] = graph.logit_probabilities
    return w


def node_influence(graph: Graph) -> Tensor:
    return influence(normalized(graph.adjacency), logit_weights(graph))


def threshold_for(scores: Tensor, fraction: float) -> Tensor:
    """The smallest score among the top scores that together hold `fraction` of the total (scores ≥ 0).

    On an (N, N) edge-score matrix this is pruning's largest temporary, so the descending order is made without an
    index array: the positive scores are gathered, sorted in place (numpy, values only) and written in front of a
    zero array of the full length (the zeros sort last), which is then summed and accumulated exactly as a full
    descending sort would be."""
    flat = scores.flatten()
    positive = flat[flat > 0].neg_()
    values = positive.numpy()
    values.sort()                     # in place: ascending of the negated = descending of the scores
    values *= -1
    ordered = torch.zeros(flat.numel(), dtype=flat.dtype)
    ordered[:positive.numel()] = positive
    del positive, values
    total = ordered.sum()
    if total <= 0:
        return ordered[0] if ordered.numel() else torch.tensor(0.0)
    cumulative = torch.cumsum(ordered, 0).div_(total)
    at = min(int(torch.searchsorted(cumulative, torch.tensor(fraction, dtype=cumulative.dtype))), ordered.numel() - 1)
    return ordered[at]


@dataclass
class Pruned:
    node_mask: Tensor       # (N,) bool
    edge_mask: Tensor       # (N, N) bool, [target, source]
    influence: Tensor       # (N,) node influence on the output (before pruning)
    cumulative: Tensor      # (N,) each node's cumulative influence share when nodes are sorted by influence


def prune(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Pruned:
    for name, value in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
        if not 0.0 <= value <= 1.0:
            raise FeaturekitError(f"{name} must be in [0, 1], got {value}")
    n_f, fixed = graph.n_features, graph.token_index(0)   # nodes from `fixed` on (tokens, logits) are always kept
    w = logit_weights(graph)
    infl = node_influence(graph)
    node_mask = infl >= threshold_for(infl, node_threshold)
    node_mask[fixed:] = True

    # Â of the kept subgraph, then turned into the edge scores in place: one (N, N) float copy besides A
    a_hat = graph.adjacency.abs()
    a_hat[~node_mask] = 0
    a_hat[:, ~node_mask] = 0
    present = a_hat != 0                                   # the subgraph's edges (bool)
    a_hat.div_(a_hat.sum(1, keepdim=True).clamp_min(1e-10))
    edge_scores = a_hat.mul_((influence(a_hat, w) + w)[:, None])
    edge_mask = edge_scores >= threshold_for(edge_scores, edge_threshold)
    del a_hat, edge_scores
    edge_mask &= present
    del present

    while True:
        before = node_mask.clone()
        edge_mask[~node_mask] = False
        edge_mask[:, ~node_mask] = False
        node_mask[:fixed] &= edge_mask[:, :fixed].any(0)      # features and errors need an outgoing edge
        node_mask[:n_f] &= edge_mask[:n_f].any(1)              # features need an incoming edge
        if torch.equal(node_mask, before):
            break

    order = torch.argsort(infl, descending=True)
    cumulative = torch.zeros_like(infl)
    total = infl.sum().clamp_min(1e-30)
    cumulative[order] = torch.cumsum(infl[order], 0) / total
    return Pruned(node_mask, edge_mask, infl, cumulative)


def scores(graph: Graph) -> dict[str, float]:
    """The replacement and completeness scores of the unpruned graph (module docstring)."""
    a_hat = normalized(graph.adjacency)
    w = logit_weights(graph)
    infl = influence(a_hat, w)
    errors = slice(graph.error_index(0, 0), graph.token_index(0))
    tokens = slice(graph.token_index(0), graph.logit_index(0))
    token_infl, error_infl = float(infl[tokens].sum()), float(infl[errors].sum())
    non_error = 1 - a_hat[:, errors].sum(1)
    out = infl + w          # as circuit-tracer: nodes without inputs (tokens, errors) count as fully explained
    return {"replacement_score": token_infl / max(token_infl + error_infl, 1e-30),
            "completeness_score": float((non_error * out).sum() / out.sum().clamp_min(1e-30))}
