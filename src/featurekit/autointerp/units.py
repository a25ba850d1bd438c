"""What gets explained: a set of units, each a function of the activations at one site.

- `FeatureUnits`: the run's dictionary features (codes of `dictionary.encode`); their neighbours come from the
  feature store (decoder cosine, then co-firing partners: `run.Explain.neighbours`).
- `NeuronUnits`: the model's own MLP neurons at a layer (`mlp_hidden.L`); neighbours: the most similar output
  directions (columns of the down projection) among the units explained.
- `RandomUnits`: random unit directions at the run's site (a seeded Gaussian, normalised); neighbours: the most
  similar directions among those explained.

Neurons and random directions are dense (non-zero on nearly every token). To be explained and scored like
sparse features they are thresholded: a unit "fires" where its value exceeds its (1 − density) quantile over
the pool, and its activation is the excess over that threshold. `density` defaults to the median density of the
run's live features, so every control fires as often as a typical feature.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import FeaturekitError
from ..models.sites import parse_site, resolve, site_dim


class FeatureUnits:
    dense = False

    def __init__(self, dictionary: Any, site: str) -> None:
        self.dictionary, self.site = dictionary, site
        self.kind = "features"
        self.n_units = int(dictionary.n_latents)
        self._device = next(dictionary.parameters(), torch.empty(0)).device

    @torch.no_grad()
    def encode(self, x: torch.Tensor, units: list[int]) -> torch.Tensor:
        cols = torch.tensor(units, dtype=torch.long, device=self._device)
        step = max(1, (1 << 22) // self.n_units)
        parts = [self.dictionary.encode(x[s:s + step].to(self._device).float())[:, cols].float().cpu() for s in range(0, len(x), step)]
        return torch.cat(parts) if parts else torch.zeros(0, len(units))


class _DirectionUnits:
    """Units that read one direction each (rows of `directions`); neighbours by cosine among the units explained."""

    dense = True
    directions: torch.Tensor

    def neighbours(self, unit: int, among: list[int], k: int) -> list[int]:
        others = [u for u in among if u != unit]
        if not others:
            return []
        d = torch.nn.functional.normalize(self.directions[[unit] + others].float(), dim=-1)
        cos = d[1:] @ d[0]
        order = torch.argsort(cos, descending=True, stable=True)[:k]
        return [others[int(i)] for i in order]


class NeuronUnits(_DirectionUnits):
    def __init__(self, model: Any, layer: int) -> None:
        self.site = f"mlp_hidden.{int(layer)}"
        self.kind = self.site
        self.n_units = site_dim(model, self.site)
        point = resolve(model, self.site)
        weight = point.module.weight.detach().float().cpu()
        # the down projection: nn.Linear stores (d_model, d_mlp), GPT-2's Conv1D (d_mlp, d_model); a row per neuron
        self.directions = weight.T if isinstance(point.module, torch.nn.Linear) else weight
        if self.directions.shape[0] != self.n_units:
            raise FeaturekitError(f"cannot read the output directions of {self.site}: weight of shape {tuple(weight.shape)}")

    def encode(self, x: torch.Tensor, units: list[int]) -> torch.Tensor:
        return x[:, units].float().cpu()


class RandomUnits(_DirectionUnits):
    def __init__(self, model: Any, site: str, n_units: int, seed: int) -> None:
        parse_site(site)
        self.site, self.kind, self.n_units = site, "random", int(n_units)
        d = site_dim(model, site)
        gen = torch.Generator().manual_seed(int(seed))
        self.directions = torch.nn.functional.normalize(torch.randn(self.n_units, d, generator=gen), dim=-1)

    def encode(self, x: torch.Tensor, units: list[int]) -> torch.Tensor:
        return x.float().cpu() @ self.directions[units].T
