"""Influence on the output through an attribution graph (circuit-tracer's definition; `prune` uses it, and
`attribution` uses it to pick which features' rows to compute first when the number of feature nodes is capped).

With Â = |A| row-normalised (each target's inputs as shares) and w the logit targets' probabilities (zero
elsewhere), a node's influence is  w Â + w Â² + …  (the series ends: the graph is acyclic).
"""

from __future__ import annotations

from torch import Tensor

from ..errors import FeaturekitError


def normalized(adjacency: Tensor) -> Tensor:
    """|A| with rows scaled to sum 1 (all-zero rows stay zero): one (N, N) copy, scaled in place."""
    a = adjacency.abs()
    return a.div_(a.sum(1, keepdim=True).clamp_min(1e-10))


def influence(a_hat: Tensor, weights: Tensor, max_iter: int = 10_000) -> Tensor:
    """w Â + w Â² + … for a row-normalised acyclic Â."""
    current = weights @ a_hat
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ a_hat
        total += current
    raise FeaturekitError("influence did not converge: the adjacency matrix has a cycle (a graph bug; please report it)")
