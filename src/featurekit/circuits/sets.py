"""The transcoder sets in memory: `TranscoderSet` (one transcoder per layer, layer L reading `mlp_in.L` and
predicting `mlp_out.L`) and `CrossLayerSet` (one cross-layer transcoder, `dictionaries.clt`, over many layers).
Both answer the questions the circuits code asks of a set:

    encode(L, m)            codes (T, F) of layer L's latents from its MLP input m
    pre_activation(L, m)    their pre-activations; encoder_rows(L, latents), encoder_bias(L, latents)
    targets(L)              the layers layer L's latents write to ([L] for a per-layer transcoder)
    decoder_rows(L, L', latents)   what unit codes of layer L's latents write into layer L''s MLP output
    output_bias(L), skip(L, m), skip_weight(L)
    prediction(L, codes, m) layer L's MLP output predicted from {layer: codes} (every source writing to L)

A set refuses a dictionary that is not a transcoder or whose sites (its file's `source.site`,
`source.output_site`) are not `mlp_in.L` → `mlp_out.L` for the layer it is listed under. Partial sets:
`partial_set.py`; the set folder on disk: `transcoder_set.py`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..dictionaries import CrossLayerTranscoder, Dictionary
from ..dictionaries.operators import topk
from ..errors import FeaturekitError

KIND_PLT, KIND_CLT = "transcoder_set", "cross_layer_transcoder"


@dataclass
class TranscoderSet:
    """`transcoders[L]` maps the MLP input of layer L to its MLP output; `model` names the source model."""

    transcoders: dict[int, Dictionary]
    model: str | None = None
    paths: dict[int, str] = field(default_factory=dict)  # where each was read from (the graph's transcoder_list)

    def __post_init__(self) -> None:
        if not self.transcoders:
            raise FeaturekitError("a transcoder set needs at least one transcoder: pass {layer: transcoder}")
        self.transcoders = {int(layer): tc for layer, tc in sorted(self.transcoders.items())}
        for layer, tc in self.transcoders.items():
            check_transcoder(layer, tc)

    @property
    def layers(self) -> list[int]:
        return list(self.transcoders)

    def __getitem__(self, layer: int) -> Dictionary:
        return self.transcoders[layer]

    def check_covers(self, n_layers: int) -> None:
        """Every layer 0..n_layers-1 has a transcoder (the replacement model swaps every MLP)."""
        missing = [layer for layer in range(n_layers) if layer not in self.transcoders]
        extra = [layer for layer in self.transcoders if layer >= n_layers]
        if missing or extra:
            raise FeaturekitError(
                f"the transcoder set has layers {self.layers} but the model has layers 0..{n_layers - 1}"
                + (f" (missing {missing})" if missing else "") + (f" (no such layers: {extra})" if extra else "")
                + "; train a transcoder (mlp_in.L → mlp_out.L) for every layer of this model, or make the gaps explicit "
                "error nodes with `partial(set, n_layers)` (`--partial-set` on the command line)")

    kind = KIND_PLT

    def width(self, layer: int) -> int:
        return self.transcoders[layer].n_latents

    def listing(self) -> list[str]:
        """Where each layer's transcoder came from (the graph's transcoder_list)."""
        return [self.paths.get(layer, f"layer {layer}") for layer in self.layers]

    def to(self, device: str | torch.device) -> TranscoderSet:
        return TranscoderSet({layer: tc.to(device) for layer, tc in self.transcoders.items()}, self.model, self.paths)

    # -- what the circuits code asks of a set (module docstring) -------------------------------
    def encode(self, layer: int, m: Tensor) -> Tensor:
        return self.transcoders[layer].encode(m)

    def pre_activation(self, layer: int, m: Tensor) -> Tensor:
        return self.transcoders[layer].pre_activation(m)

    def encoder_rows(self, layer: int, latents: Tensor) -> Tensor:
        return self.transcoders[layer].W_enc[latents]

    def encoder_bias(self, layer: int, latents: Tensor) -> Tensor:
        return self.transcoders[layer].b_enc[latents]

    def targets(self, layer: int) -> list[int]:
        return [layer]

    def decoder_rows(self, source: int, target: int, latents: Tensor) -> Tensor:
        if target != source:
            raise FeaturekitError(f"a per-layer transcoder of layer {source} writes only to layer {source}, not {target}")
        return self.transcoders[source].W_dec[latents]

    def output_bias(self, layer: int) -> Tensor:
        return self.transcoders[layer].b_dec

    def skip(self, layer: int, m: Tensor) -> Tensor | float:
        tc = self.transcoders[layer]
        return tc.skip(m) if hasattr(tc, "skip") else 0.0

    def skip_weight(self, layer: int) -> Tensor | None:
        return getattr(self.transcoders[layer], "W_skip", None)

    def prediction(self, layer: int, codes: Mapping[int, Tensor], m: Tensor) -> Tensor:
        return self.transcoders[layer].reconstruct_from(m, codes[layer])

    def folded(self) -> TranscoderSet:
        """A copy in float32 with every normalisation scale folded into the weights (codes in raw units,
        `W_dec` rows the raw output directions): the form the circuits code computes with."""
        out = {}
        for layer, tc in self.transcoders.items():
            tc = copy.deepcopy(tc).float().eval()
            tc.fold_input_scale()
            for p in tc.parameters():
                p.requires_grad_(False)
            out[layer] = tc
        return TranscoderSet(out, self.model, dict(self.paths))


@dataclass
class CrossLayerSet:
    """A cross-layer transcoder over the model's `layers` (its layer i is model layer layers[i]): layer L's
    latents read mlp_in.L and write to mlp_out.L' for every L' ≥ L in the set."""

    clt: CrossLayerTranscoder
    layers: list[int]
    model: str | None = None
    path: str | None = None

    kind = KIND_CLT

    def __post_init__(self) -> None:
        if not isinstance(self.clt, CrossLayerTranscoder):
            raise FeaturekitError(f"a cross-layer set needs a CLT (method 'clt'), got a {getattr(self.clt, 'method', type(self.clt))} "
                                  "dictionary; per-layer transcoders make a TranscoderSet")
        self.layers = [int(layer) for layer in self.layers]
        if len(self.layers) != self.clt.n_layers or self.layers != sorted(set(self.layers)):
            raise FeaturekitError(f"the CLT spans {self.clt.n_layers} layers but is listed for layers {self.layers}; "
                                  "list one increasing model layer per CLT layer")
        self.clt.check_causal()
        self.index = {layer: i for i, layer in enumerate(self.layers)}

    def check_covers(self, n_layers: int) -> None:
        if self.layers != list(range(n_layers)):
            raise FeaturekitError(f"the CLT spans layers {self.layers} but the model has layers 0..{n_layers - 1}; the "
                                  "replacement model swaps every MLP: train the CLT on every layer (--layers all)")

    def width(self, layer: int) -> int:
        return self.clt.per_layer

    def listing(self) -> list[str]:
        return [self.path or "cross-layer transcoder"]

    def to(self, device: str | torch.device) -> CrossLayerSet:
        return CrossLayerSet(self.clt.to(device), self.layers, self.model, self.path)

    def folded(self) -> CrossLayerSet:
        """A float32 copy without gradients (a CLT's weights are in raw units already)."""
        clt = copy.deepcopy(self.clt).float().eval()
        for p in clt.parameters():
            p.requires_grad_(False)
        return CrossLayerSet(clt, self.layers, self.model, self.path)

    def _rows(self, layer: int) -> slice:
        i, F = self.index[layer], self.clt.per_layer
        return slice(i * F, (i + 1) * F)

    # -- what the circuits code asks of a set (module docstring) -------------------------------
    def pre_activation(self, layer: int, m: Tensor) -> Tensor:
        rows = self._rows(layer)
        return m.to(self.clt.W_enc.dtype) @ self.clt.W_enc[rows].T + self.clt.b_enc[rows]

    def encode(self, layer: int, m: Tensor) -> Tensor:
        return topk(self.pre_activation(layer, m), self.clt.k)

    def encoder_rows(self, layer: int, latents: Tensor) -> Tensor:
        return self.clt.W_enc[self._rows(layer)][latents]

    def encoder_bias(self, layer: int, latents: Tensor) -> Tensor:
        return self.clt.b_enc[self._rows(layer)][latents]

    def targets(self, layer: int) -> list[int]:
        return self.layers[self.index[layer]:]

    def decoder_rows(self, source: int, target: int, latents: Tensor) -> Tensor:
        if self.index[target] < self.index[source]:
            raise FeaturekitError(f"a CLT's layer-{source} latents do not write to the earlier layer {target}")
        return self.clt.decoder(self.index[source], self.index[target])[latents]

    def output_bias(self, layer: int) -> Tensor:
        return self.clt.b_dec[self.clt.layer_slice(self.index[layer], out=True)]

    def skip(self, layer: int, m: Tensor) -> float:
        return 0.0

    def skip_weight(self, layer: int) -> None:
        return None

    def prediction(self, layer: int, codes: Mapping[int, Tensor], m: Tensor) -> Tensor:
        """Σ over the set's layers L ≤ `layer` of codes[L] W_dec,L→layer, + b_dec of `layer`."""
        out = self.output_bias(layer)
        for source in self.layers[:self.index[layer] + 1]:
            out = out + codes[source] @ self.clt.decoder(self.index[source], self.index[layer])
        return out


AnySet = TranscoderSet | CrossLayerSet


def sites_of(tc: Dictionary) -> tuple[str | None, str | None]:
    source = (getattr(tc, "metadata", None) or {}).get("source", {}) or {}
    return source.get("site"), source.get("output_site")


def check_transcoder(layer: int, tc: Dictionary) -> None:
    if not getattr(tc, "transcodes", False):
        raise FeaturekitError(f"the {tc.method} dictionary given for layer {layer} is not a transcoder (it reconstructs "
                              "its own input); a transcoder set needs transcoders trained mlp_in.L → mlp_out.L")
    site, out = sites_of(tc)
    if site is not None and (site, out) != (f"mlp_in.{layer}", f"mlp_out.{layer}"):
        raise FeaturekitError(f"the transcoder given for layer {layer} was trained on {site} → {out}; a set needs "
                              f"mlp_in.{layer} → mlp_out.{layer} there (list each transcoder under its own layer)")
