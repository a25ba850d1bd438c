"""Dead-latent tracking: tokens since each latent last fired (fired = code ≠ 0)."""

from __future__ import annotations

import torch

from .collectives import batch_sum, global_rows


class DeadLatentTracker:
    """A latent is dead when it has not fired in the last `window` tokens.

    "Fired" means a non-zero code, so signed codes count too (never `codes.sum(0) > 0`).
    """

    def __init__(self, n_latents: int, window: int, density_decay: float = 0.99):
        self.window = int(window)
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.long)
        #: per-latent firing density (fraction of tokens with a non-zero code): an EMA over batches
        #: with factor `density_decay`, started at the first batch's value (used by aux_zipf_loss).
        self.density = torch.full((n_latents,), float("nan"))
        self.density_decay = float(density_decay)

    def update(self, codes: torch.Tensor) -> None:
        self.update_counts((codes != 0).sum(0), codes.shape[0])

    def update_counts(self, counts: torch.Tensor, n_tokens: int) -> None:
        """`counts` (F,): tokens of a batch of `n_tokens` on which each latent fired."""
        # data parallel: the global batch's counts and size (train/collectives.py)
        counts, n_tokens = batch_sum(counts).cpu(), global_rows(n_tokens)
        self.tokens_since_fired += n_tokens
        self.tokens_since_fired[counts > 0] = 0
        rate = counts.float() / max(n_tokens, 1)
        if torch.isnan(self.density).any():
            self.density = rate
        else:
            self.density.mul_(self.density_decay).add_((1 - self.density_decay) * rate)

    @property
    def dead(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.window

    def dead_fraction(self) -> float:
        return float(self.dead.float().mean())
