"""Partial sets: a per-layer transcoder set that does not cover every layer of the model, made explicit
(`partial(tset, n_layers)`, `--partial-set` on the command line). A layer without a transcoder has no latents and
predicts 0, so its whole MLP output is that layer's error node: the replacement stays exact, but there are no
features at those layers."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..dictionaries import Dictionary
from ..errors import FeaturekitError
from .sets import TranscoderSet

NO_TRANSCODER = "none"  # a partial set's transcoder_list entry for a layer without a transcoder


class PartialSet(TranscoderSet):
    """A per-layer set that does NOT cover every layer, made explicit (`partial(tset, n_layers)`): a layer without a
    transcoder has no latents, predicts 0, and so its whole MLP output is that layer's error node (exact, but no
    features there). Results from it are a partial set's and say so (`covered`, `missing`)."""

    def __init__(self, transcoders: dict[int, Dictionary], n_layers: int, model: str | None = None,
                 paths: dict[int, str] | None = None):
        super().__init__(transcoders, model, dict(paths or {}))
        self.n_layers = int(n_layers)
        extra = [layer for layer in self.transcoders if not 0 <= layer < self.n_layers]
        if extra:
            raise FeaturekitError(f"the set has layers {extra} that a {self.n_layers}-layer model does not have")
        first = next(iter(self.transcoders.values()))
        self.d_in, self.d_out = int(first.W_enc.shape[1]), int(first.W_dec.shape[1])

    @property
    def covered(self) -> list[int]:
        return list(self.transcoders)

    @property
    def missing(self) -> list[int]:
        return [layer for layer in range(self.n_layers) if layer not in self.transcoders]

    def check_covers(self, n_layers: int) -> None:
        if n_layers != self.n_layers:
            raise FeaturekitError(f"the partial set was made for {self.n_layers} layers but the model has {n_layers}")

    def width(self, layer: int) -> int:
        return self.transcoders[layer].n_latents if layer in self.transcoders else 0

    def listing(self) -> list[str]:
        return [self.paths.get(layer, f"layer {layer}") if layer in self.transcoders else NO_TRANSCODER
                for layer in range(self.n_layers)]

    def to(self, device: str | torch.device) -> PartialSet:
        return PartialSet({layer: tc.to(device) for layer, tc in self.transcoders.items()}, self.n_layers, self.model, self.paths)

    def folded(self) -> PartialSet:
        return PartialSet(super().folded().transcoders, self.n_layers, self.model, self.paths)

    def _empty(self, layer: int) -> bool:
        return layer not in self.transcoders

    def _like(self, m: Tensor, width: int) -> Tensor:
        return torch.zeros(*m.shape[:-1], width, dtype=torch.float32, device=m.device)

    def _device(self) -> torch.device:
        return next(iter(self.transcoders.values())).W_enc.device

    def encode(self, layer: int, m: Tensor) -> Tensor:
        return self._like(m, 0) if self._empty(layer) else super().encode(layer, m)

    def pre_activation(self, layer: int, m: Tensor) -> Tensor:
        return self._like(m, 0) if self._empty(layer) else super().pre_activation(layer, m)

    def encoder_rows(self, layer: int, latents: Tensor) -> Tensor:
        return torch.zeros(0, self.d_in, device=self._device()) if self._empty(layer) else super().encoder_rows(layer, latents)

    def encoder_bias(self, layer: int, latents: Tensor) -> Tensor:
        return torch.zeros(0, device=self._device()) if self._empty(layer) else super().encoder_bias(layer, latents)

    def decoder_rows(self, source: int, target: int, latents: Tensor) -> Tensor:
        return torch.zeros(0, self.d_out, device=self._device()) if self._empty(source) else super().decoder_rows(source, target, latents)

    def output_bias(self, layer: int) -> Tensor:
        return torch.zeros(self.d_out, device=self._device()) if self._empty(layer) else super().output_bias(layer)

    def skip(self, layer: int, m: Tensor) -> Tensor | float:
        return 0.0 if self._empty(layer) else super().skip(layer, m)

    def skip_weight(self, layer: int) -> Tensor | None:
        return None if self._empty(layer) else super().skip_weight(layer)

    def prediction(self, layer: int, codes: Mapping[int, Tensor], m: Tensor) -> Tensor:
        return self._like(m, self.d_out) if self._empty(layer) else super().prediction(layer, codes, m)


def partial(tset: TranscoderSet, n_layers: int) -> PartialSet:
    """`tset` as an explicit partial set of an n_layers model (PartialSet): layers without a transcoder become
    whole-MLP error nodes. Only per-layer sets."""
    if not isinstance(tset, TranscoderSet):
        raise FeaturekitError("only a per-layer transcoder set can be partial; a CLT names its own layers")
    return PartialSet(dict(tset.transcoders), n_layers, tset.model, dict(tset.paths))
