"""Reading and editing one layer's MLP hidden units (``mlp_hidden.L``) of a comparison model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ...models.hooks import capture_activations
from ...models.moexlm.lm import MoexLM
from ..chess import encode
from ..train import batch_at


def hidden(model: MoexLM, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """(B, T, units) of site ``mlp_hidden.layer`` (the input of ``blocks[layer].mlp.down``)."""
    site = f"mlp_hidden.{layer}"
    return capture_activations(model, ids, [site])[site].float()


def harvest(model: MoexLM, stream: torch.Tensor, layer: int, tokens: int, batch: int, seed: int) -> torch.Tensor:
    """(tokens, units) hidden activations on training windows (batches numbered apart from training's)."""
    seq = model.config.seq_len
    rows, step = [], 1 << 41
    while sum(r.shape[0] for r in rows) < tokens:
        x, _ = batch_at(stream, step, batch, seq, seed)
        rows.append(hidden(model, x, layer).reshape(-1, model.blocks[layer].mlp.down.in_features))
        step += 1
    return torch.cat(rows)[:tokens]



def spliced(model: MoexLM, layer: int, sae: Any) -> Callable[[], None]:
    """Replace layer ``layer``'s MLP hidden units by the SAE's reconstruction; returns the undo."""
    def pre(_module, args):
        return (sae.decode(sae.encode(args[0])),)
    handle = model.blocks[layer].mlp.down.register_forward_pre_hook(pre)
    return handle.remove


def unit_acts(model: MoexLM, games: list[str], layer: int, encode_units: Callable | None) -> list[torch.Tensor]:
    out = []
    for game in games:
        h = hidden(model, encode(game)[None], layer)[0]
        out.append(encode_units(h) if encode_units is not None else h)
    return out

