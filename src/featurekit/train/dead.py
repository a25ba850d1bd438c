"""Dead-latent tracking: tokens since each latent last fired (fired = code ≠ 0)."""

from __future__ import annotations

import torch


class DeadLatentTracker:
    """A latent is dead when it has not fired in the last `window` tokens.

    "Fired" means a non-zero code, so signed codes count too (never `codes.sum(0) > 0`).
    """

    def __init__(self, n_latents: int, window: int):
        self.window = int(window)
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.long)

    def update(self, codes: torch.Tensor) -> None:
        fired = (codes != 0).any(dim=0).cpu()
        self.tokens_since_fired += codes.shape[0]
        self.tokens_since_fired[fired] = 0

    @property
    def dead(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.window

    def dead_fraction(self) -> float:
        return float(self.dead.float().mean())
