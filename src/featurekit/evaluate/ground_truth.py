"""Synthetic activations with known features: the ground truth a dictionary should recover.

A token is a sparse non-negative (or, for bidirectional features, signed) mixture of `n_features`
random unit vectors in `d` dimensions (`n_features > d`: superposition), plus optional dense noise:

    x = Σ_i a_i f_i + ε,      f_i ∈ R^d, ‖f_i‖ = 1,   ε ~ N(0, σ² I)

Which features fire (a_i ≠ 0):

* **roots** (every feature that is not a child) fire with Zipf-like probabilities: the root of rank
  r (its index order, 1-based) fires with probability p_r = min(1, c · r^(−s)), `s` =
  `zipf_exponent`, with c chosen so that the expected number of active features per token is `k`.
* **correlated groups** (`n_groups` groups of `group_size` free roots): root i fires when
  z_i = √ρ g + √(1−ρ) e_i exceeds Φ⁻¹(1 − p_i), with g ~ N(0, 1) shared by the group and e_i ~ N(0, 1)
  its own (a Gaussian copula). Each root keeps its marginal p_i exactly; roots of a group co-fire
  (ρ = `group_correlation`). Ungrouped roots use ρ = 0 (independent).
* **hierarchy** (`n_parents` parents, each with `children_per_parent` mutually exclusive children):
  parents are the first, most frequent roots; whenever a parent fires, exactly one of its children,
  uniformly chosen, fires with it, and a child never fires without its parent (child frequency =
  p_parent / children_per_parent). This is the structure of the feature-absorption studies
  (Chanin et al. 2024, "A is for Absorption") and of MP-SAE's hierarchical data (Costa et al. 2025).
* **bidirectional** features (a fraction `bidirectional_fraction` of the free roots, i.e. neither
  parents, children nor grouped) take a random sign, ± with probability ½, each time they fire:
  the AbsTopK case (Zhu et al. 2025). Every other magnitude is positive.

Magnitudes |a_i| are drawn independently per firing from `magnitude`: "uniform" on
[mean − spread, mean + spread], "lognormal" (mean `magnitude_mean`, log-std `magnitude_spread`),
"exponential" (mean `magnitude_mean`) or "constant" (= `magnitude_mean`).

Feature layout by index: parents `0..P−1`, children `P..P+P·m−1` (parent q owns `P+q·m .. P+q·m+m−1`),
then the free roots. Everything is a function of the config and its `seed`: the features come from
`seed`, each token stream from its own stream seed (both mixed with `seed`, so the features never
repeat the random directions a dictionary initialised with the same seed starts from), and
`stream()` yields batches forever without holding the tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import FeaturekitError

MAGNITUDES = ("uniform", "lognormal", "exponential", "constant")
FEATURE_STREAM = -1  #: the features' own generator stream (token streams are numbered from 0)
DATASETS = ("default", "hierarchical", "bidirectional")


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that defines a synthetic dataset (see the module docstring for the model)."""

    d: int = 32  #: activation dimension
    n_features: int = 96  #: true features (> d: superposition)
    k: float = 4.0  #: expected number of active features per token
    zipf_exponent: float = 0.5  #: s in p_r ∝ r^(−s) over the roots (0 = equal frequencies)
    magnitude: str = "uniform"  #: uniform | lognormal | exponential | constant
    magnitude_mean: float = 1.0
    magnitude_spread: float = 0.5  #: uniform: half-width; lognormal: std of log
    n_groups: int = 0  #: groups of free roots that tend to co-fire
    group_size: int = 4
    group_correlation: float = 0.5  #: ρ of the Gaussian copula inside a group
    n_parents: int = 0  #: hierarchy: parents, each with `children_per_parent` exclusive children
    children_per_parent: int = 4
    bidirectional_fraction: float = 0.0  #: share of the free ungrouped roots used with both signs
    noise_std: float = 0.0  #: σ of dense Gaussian noise per dimension
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def dataset_config(name: str, **overrides: Any) -> SyntheticConfig:
    """The benchmark's named datasets: `default` (Zipf frequencies, ⌊n/24⌋ correlated groups of 4, noise
    σ = 0.01), `hierarchical` (default + ⌊n/16⌋ ≥ 1 parents with 3 exclusive children each: a quarter of
    the features), `bidirectional` (default + half of the free ungrouped roots used with both signs).
    `overrides` set any `SyntheticConfig` field (the structure follows the overridden n_features)."""
    n = overrides.get("n_features", SyntheticConfig.n_features)
    base = {"n_groups": n // 24, "group_size": 4, "group_correlation": 0.5, "noise_std": 0.01}
    extra = {"default": {}, "hierarchical": {"n_parents": max(1, n // 16), "children_per_parent": 3},
             "bidirectional": {"bidirectional_fraction": 0.5}}
    if name not in extra:
        raise FeaturekitError(f"unknown synthetic dataset {name!r}; choose one of {list(DATASETS)}")
    return SyntheticConfig(**{**base, **extra[name], **overrides})


def zipf_probabilities(weights: torch.Tensor, multiplicity: torch.Tensor, k: float) -> torch.Tensor:
    """p = min(1, c·w) with c such that Σ multiplicity·p = k (bisection on c; float64).

    `multiplicity` counts the active features a firing root brings (2 for a parent: itself and one child).
    """
    weights, multiplicity = weights.double(), multiplicity.double()
    if k > float(multiplicity.sum()):
        raise FeaturekitError(f"k={k} active features per token is more than the {int(multiplicity.sum())} the features can give; "
                              "lower k or add features")
    lo, hi = 0.0, 1.0
    while float((multiplicity * (hi * weights).clamp(max=1)).sum()) < k:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float((multiplicity * (mid * weights).clamp(max=1)).sum()) < k else (lo, mid)
    return (hi * weights).clamp(max=1)


class SyntheticData:
    """The features and firing model of one `SyntheticConfig`; draws tokens with `sample` / `stream`.

    Attributes (all tensors on CPU):
      features        (n_features, d) unit rows
      probability     (n_features,) marginal firing probability of each feature
      parent          (n_features,) parent index of each child, −1 for roots
      children        (n_parents, children_per_parent) child indices
      bidirectional   (n_features,) bool
      group           (n_features,) group index of grouped roots, −1 otherwise
    """

    def __init__(self, cfg: SyntheticConfig):
        _validate(cfg)
        self.cfg = cfg
        n, p, m = cfg.n_features, cfg.n_parents, cfg.children_per_parent
        gen = torch.Generator().manual_seed(_mix(cfg.seed, FEATURE_STREAM))  # never a dictionary's init stream (seeded by `seed`)
        self.features = torch.nn.functional.normalize(torch.randn(n, cfg.d, generator=gen, dtype=torch.float64), dim=1).float()
        n_children = p * m
        self.roots = torch.cat([torch.arange(p), torch.arange(p + n_children, n)])
        self.children = (p + torch.arange(n_children)).view(p, m)
        self.parent = torch.full((n,), -1, dtype=torch.long)
        self.parent[p:p + n_children] = torch.arange(p).repeat_interleave(m)
        free = torch.arange(p + n_children, n)
        order = free[torch.randperm(len(free), generator=gen)]
        n_grouped = cfg.n_groups * cfg.group_size
        self.group = torch.full((n,), -1, dtype=torch.long)
        self.group[order[:n_grouped]] = torch.arange(cfg.n_groups).repeat_interleave(cfg.group_size)
        ungrouped = order[n_grouped:]
        self.bidirectional = torch.zeros(n, dtype=torch.bool)
        self.bidirectional[ungrouped[:round(cfg.bidirectional_fraction * len(ungrouped))]] = True
        ranks = torch.arange(1, len(self.roots) + 1, dtype=torch.float64)
        multiplicity = torch.ones(len(self.roots), dtype=torch.float64)
        multiplicity[:p] = 2.0
        root_p = zipf_probabilities(ranks.pow(-cfg.zipf_exponent), multiplicity, cfg.k)
        self.probability = torch.zeros(n, dtype=torch.float64)
        self.probability[self.roots] = root_p
        if p:
            self.probability[self.children] = root_p[:p, None] / m
        self._root_threshold = torch.special.ndtri(1 - root_p.clamp(max=1 - 1e-12)).float()  # fire when z > threshold
        root_group = self.group[self.roots]
        self._root_group = root_group
        self._rho = torch.where(root_group >= 0, cfg.group_correlation, 0.0).float()

    @property
    def n_features(self) -> int:
        return self.cfg.n_features

    def sample(self, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw n tokens: (x (n, d), true codes a (n, n_features)), float32."""
        cfg = self.cfg
        z = torch.randn(n, len(self.roots), generator=gen)
        if cfg.n_groups:
            shared = torch.randn(n, cfg.n_groups, generator=gen)
            grouped = self._root_group >= 0
            rho = self._rho[grouped]
            z[:, grouped] = rho.sqrt() * shared[:, self._root_group[grouped]] + (1 - rho).sqrt() * z[:, grouped]
        fires = torch.zeros(n, cfg.n_features, dtype=torch.bool)
        fires[:, self.roots] = z > self._root_threshold
        if cfg.n_parents:
            choice = torch.randint(cfg.children_per_parent, (n, cfg.n_parents), generator=gen)
            child = self.children[torch.arange(cfg.n_parents), choice]  # (n, P) the chosen child of each parent
            fires.scatter_(1, child, fires[:, :cfg.n_parents])
        codes = fires * self._magnitudes((n, cfg.n_features), gen)
        if bool(self.bidirectional.any()):
            sign = torch.where(torch.rand(n, cfg.n_features, generator=gen) < 0.5, -1.0, 1.0)
            codes = torch.where(self.bidirectional, codes * sign, codes)
        x = codes @ self.features
        if cfg.noise_std > 0:
            x = x + cfg.noise_std * torch.randn(n, cfg.d, generator=gen)
        return x, codes

    def stream(self, batch_size: int, stream_seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """An endless, deterministic stream of (x, codes) batches; each `stream_seed` is its own stream."""
        gen = torch.Generator().manual_seed(_mix(self.cfg.seed, stream_seed))
        while True:
            yield self.sample(batch_size, gen)

    def tokens(self, n: int, stream_seed: int, batch_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """The first n tokens of stream `stream_seed` (same tokens as `stream` with this batch size)."""
        xs, cs, have = [], [], 0
        for x, c in self.stream(batch_size, stream_seed):
            xs.append(x)
            cs.append(c)
            have += len(x)
            if have >= n:
                break
        return torch.cat(xs)[:n], torch.cat(cs)[:n]

    def _magnitudes(self, shape: tuple[int, int], gen: torch.Generator) -> torch.Tensor:
        cfg = self.cfg
        mean, spread = cfg.magnitude_mean, cfg.magnitude_spread
        if cfg.magnitude == "uniform":
            return mean - spread + 2 * spread * torch.rand(shape, generator=gen)
        if cfg.magnitude == "lognormal":
            return mean * torch.exp(spread * torch.randn(shape, generator=gen) - spread ** 2 / 2)
        if cfg.magnitude == "exponential":
            return -mean * torch.log1p(-torch.rand(shape, generator=gen))
        return torch.full(shape, mean)


def _mix(seed: int, stream: int) -> int:
    """A stream's generator seed from the dataset seed (distinct streams for distinct pairs)."""
    return (seed * 1_000_003 + stream * 7_919 + 12_345) % (2 ** 63)


def _validate(cfg: SyntheticConfig) -> None:
    if cfg.d <= 0 or cfg.n_features <= 0:
        raise FeaturekitError(f"synthetic d and n_features must be positive, got {cfg.d}, {cfg.n_features}")
    if not cfg.k > 0:
        raise FeaturekitError(f"synthetic k must be positive, got {cfg.k}")
    if cfg.magnitude not in MAGNITUDES:
        raise FeaturekitError(f"synthetic magnitude must be one of {list(MAGNITUDES)}, got {cfg.magnitude!r}")
    if cfg.magnitude == "uniform" and not 0 <= cfg.magnitude_spread < cfg.magnitude_mean:
        raise FeaturekitError("uniform magnitudes need 0 <= magnitude_spread < magnitude_mean (positive magnitudes)")
    if cfg.magnitude_mean <= 0 or cfg.magnitude_spread < 0 or cfg.noise_std < 0 or cfg.zipf_exponent < 0:
        raise FeaturekitError("synthetic magnitude_mean must be positive; magnitude_spread, noise_std and zipf_exponent non-negative")
    if cfg.n_parents < 0 or cfg.n_groups < 0 or (cfg.n_parents and cfg.children_per_parent < 1) or (cfg.n_groups and cfg.group_size < 1):
        raise FeaturekitError("synthetic n_parents, n_groups must be >= 0 and children_per_parent, group_size >= 1 when used")
    free = cfg.n_features - cfg.n_parents * (1 + cfg.children_per_parent)
    if free < cfg.n_groups * cfg.group_size:
        raise FeaturekitError(f"{cfg.n_features} features leave {free} free roots after the hierarchy, fewer than the "
                              f"{cfg.n_groups}×{cfg.group_size} grouped ones; add features or shrink the hierarchy/groups")
    if not 0 <= cfg.group_correlation <= 1 or not 0 <= cfg.bidirectional_fraction <= 1:
        raise FeaturekitError("synthetic group_correlation and bidirectional_fraction must lie in [0, 1]")
