"""The comparison's settings, the model names and the character vocabulary they share (compare/__init__.py)."""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import FeaturekitError
from ...models.moexlm.lm import LMConfig
from ..chess import VOCAB, GameSpec
from ..train import TrainSettings

MODELS = ("dense_gelu", "dense_relu", "switch", "moex", "moex_upcycled")
ENTRIES = MODELS + ("sae",)
KIND = {"dense_gelu": "dense_gelu", "dense_relu": "dense_relu", "switch": "switch", "moex": "moex", "moex_upcycled": "moex"}
# Characters the models read: the 32 of the chess format; id 32 is the reserved <pad> of moex.stream, so
# the run folders are featurekit models too (sites, feature store, explorer, autointerp).
N_CHARS = len(VOCAB)


@dataclass
class CompareSettings:
    d_model: int = 64
    n_layer: int = 2
    n_head: int = 4
    seq_len: int = 256
    n_experts: int = 8
    top_k: int = 1
    batch_size: int = 16
    lr: float = 1e-3
    steps: int = 0                  # optimiser steps per model; 0: from minutes_per_model
    minutes_per_model: float = 0.0  # time budget of the slowest kind (MoE-X), used to choose steps once
    checkpoint_every: int = 100
    games: int = 2000               # training games
    eval_games: int = 100           # held-out games (half label the units, half score the reconstruction)
    max_chars: int = 256            # game length cap (Karvonen et al.'s evaluation cut); at most seq_len
    greedy: float = 0.5             # random policy: chance of the one-ply heuristic's move instead of a random legal one
    policy: str = "random"          # the games: random (random/greedy legal play) or stockfish (chess/engine.py)
    stockfish_nodes: int = 500      # stockfish policy: the engine's nodes per move at the strongest level
    layer: int = -1                 # the layer whose units are read (-1: the last)
    legal_prefixes: int = 200       # held-out prefixes for the legal-move rate
    sae_k: int = 0                  # 0: MoE-X's measured L0 at the layer
    sae_latents: int = 0            # 0: n_experts · expert width (MoE-X's units)
    sae_tokens: int = 65_536        # activations harvested for the SAE
    sae_batch: int = 1024
    sae_epochs: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.steps > 0) == (self.minutes_per_model > 0):
            raise FeaturekitError("give exactly one of steps (a fixed step count) or minutes_per_model (a time budget "
                                  f"for the slowest model); got steps={self.steps}, minutes_per_model={self.minutes_per_model}")
        if self.max_chars > self.seq_len:
            raise FeaturekitError(f"max_chars={self.max_chars} > seq_len={self.seq_len}: a whole game must fit the context; "
                                  "lower max_chars or raise seq_len")
        if not -self.n_layer <= self.layer < self.n_layer:
            raise FeaturekitError(f"layer={self.layer} is not one of the {self.n_layer} layers (use 0..{self.n_layer - 1} or -1)")
        if self.eval_games < 2 or self.games < 1 or self.legal_prefixes < 1:
            raise FeaturekitError("games ≥ 1, eval_games ≥ 2 (two halves) and legal_prefixes ≥ 1 needed")

    def games_spec(self) -> GameSpec:
        return GameSpec(policy=self.policy, greedy=self.greedy, max_chars=self.max_chars, stockfish_nodes=self.stockfish_nodes)

    @property
    def layer_index(self) -> int:
        return self.layer % self.n_layer

    def lm(self, name: str) -> LMConfig:
        return LMConfig(vocab_size=N_CHARS + 1, mlp=KIND[name], d_model=self.d_model, n_layer=self.n_layer,
                        n_head=self.n_head, seq_len=self.seq_len, n_experts=self.n_experts, top_k=self.top_k)

    def train(self, steps: int) -> TrainSettings:
        return TrainSettings(steps=steps, batch_size=self.batch_size, lr=self.lr, checkpoint_every=self.checkpoint_every,
                             seed=self.seed)



def say(msg: str, progress: bool) -> None:
    """A progress line (the comparison's steps print one each when ``progress``)."""
    if progress:
        print(msg, flush=True)
