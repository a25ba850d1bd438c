"""`ActivationBatch`: the unit of activations that flows from harvesting to the cache and the shuffler.

One row per kept token. `acts[site]` is a (n, d_site) tensor (float32 or the model dtype, e.g.
bfloat16; consumers cast), and the three index tensors say where each row came from:
`token_ids[i]` is the token at `input_ids[context_idx[i], position[i]]`.
This file imports only torch so that `data.cache` and `data.shuffle` need not import `models`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ActivationBatch:
    """Activations of `n` tokens at one or more sites, with their provenance.

    acts:        site name -> (n, d) tensor
    token_ids:   (n,) int64, the token id of each row
    context_idx: (n,) int64, index of the row's context in the harvested `input_ids` (N, T)
    position:    (n,) int64, the row's position inside its context (0-based)
    """

    acts: dict[str, torch.Tensor]
    token_ids: torch.Tensor
    context_idx: torch.Tensor
    position: torch.Tensor

    @property
    def n_tokens(self) -> int:
        """Number of token rows in the batch."""
        return int(self.token_ids.shape[0])
