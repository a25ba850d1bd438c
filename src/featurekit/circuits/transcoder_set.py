"""A transcoder set: one transcoder per layer, layer L reading `mlp_in.L` and predicting `mlp_out.L`.

On disk a set is a folder holding one featurekit dictionary folder per layer and a manifest,

    SET/transcoder_set.json   {"format": "featurekit-transcoder-set", "format_version": 1,
                               "kind": "transcoder_set" (optional), "model": "<model name or null>",
                               "layers": [{"layer": 0, "path": "layer_0"}, ...]}
    SET/layer_0/              model.safetensors + featurekit.json (fileformat.save)

paths relative to SET. Each dictionary's own file says which sites it was trained on
(`source.site`, `source.output_site`); a set refuses a dictionary that is not a transcoder or whose
sites are not `mlp_in.L` → `mlp_out.L` for the layer it is listed under.

A cross-layer transcoder (`dictionaries.clt`, one dictionary for many layers) is a set of its own kind,

    SET/transcoder_set.json   {"format": "featurekit-transcoder-set", "format_version": 2,
                               "kind": "cross_layer_transcoder", "model": ..., "layers": [0, 1, ...], "path": "clt"}
    SET/clt/                  the CLT's dictionary folder (its layer i is the model's layer layers[i])

(format_version 2 only for this kind, so an older featurekit says it cannot read it). `load` returns a
`TranscoderSet` or a `CrossLayerSet`; both answer the questions the circuits code asks of a set:

    encode(L, m)            codes (T, F) of layer L's latents from its MLP input m
    pre_activation(L, m)    their pre-activations; encoder_rows(L, latents), encoder_bias(L, latents)
    targets(L)              the layers layer L's latents write to ([L] for a per-layer transcoder)
    decoder_rows(L, L', latents)   what unit codes of layer L's latents write into layer L''s MLP output
    output_bias(L), skip(L, m), skip_weight(L)
    prediction(L, codes, m) layer L's MLP output predicted from {layer: codes} (every source writing to L)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from .._io import atomic_write_json, read_json
from ..dictionaries import CrossLayerTranscoder, Dictionary, fileformat
from ..dictionaries.operators import topk
from ..errors import FeaturekitError

MANIFEST = "transcoder_set.json"
FORMAT = "featurekit-transcoder-set"
FORMAT_VERSION = 1
CLT_FORMAT_VERSION = 2  # the cross_layer_transcoder kind
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
            _check_transcoder(layer, tc)

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


AnySet = TranscoderSet | CrossLayerSet


def _sites(tc: Dictionary) -> tuple[str | None, str | None]:
    source = (getattr(tc, "metadata", None) or {}).get("source", {}) or {}
    return source.get("site"), source.get("output_site")


def _check_transcoder(layer: int, tc: Dictionary) -> None:
    if not getattr(tc, "transcodes", False):
        raise FeaturekitError(f"the {tc.method} dictionary given for layer {layer} is not a transcoder (it reconstructs "
                              "its own input); a transcoder set needs transcoders trained mlp_in.L → mlp_out.L")
    site, out = _sites(tc)
    if site is not None and (site, out) != (f"mlp_in.{layer}", f"mlp_out.{layer}"):
        raise FeaturekitError(f"the transcoder given for layer {layer} was trained on {site} → {out}; a set needs "
                              f"mlp_in.{layer} → mlp_out.{layer} there (list each transcoder under its own layer)")


def _layer_of(tc: Dictionary, where: Path) -> int:
    site, out = _sites(tc)
    if site is None:
        raise FeaturekitError(f"{where}: the dictionary's featurekit.json names no source site, so its layer is unknown; "
                              "build the set with TranscoderSet({layer: transcoder}) and save it")
    if not site.startswith("mlp_in.") or out != f"mlp_out.{site.split('.')[1]}":
        raise FeaturekitError(f"{where} was trained on {site} → {out}; a transcoder set needs mlp_in.L → mlp_out.L transcoders")
    return int(site.split(".")[1])


def from_folders(paths: Iterable[str | Path], device: str | torch.device = "cpu") -> TranscoderSet:
    """A set from featurekit dictionary folders; each one's layer comes from its file's source site."""
    transcoders: dict[int, Dictionary] = {}
    where: dict[int, str] = {}
    models = set()
    for path in map(Path, paths):
        tc = fileformat.load(path, device=device)
        layer = _layer_of(tc, path)
        if layer in transcoders:
            raise FeaturekitError(f"two dictionaries for layer {layer}: {where[layer]} and {path}; pass one per layer")
        transcoders[layer], where[layer] = tc, str(path)
        models.add((tc.metadata.get("source", {}) or {}).get("model"))
    models.discard(None)
    if len(models) > 1:
        raise FeaturekitError(f"the dictionaries come from different models ({sorted(models)}); a set is one model's")
    return TranscoderSet(transcoders, next(iter(models), None), where)


def load(folder: str | Path, device: str | torch.device = "cpu") -> TranscoderSet | CrossLayerSet:
    """Read a set folder written by `save` (its manifest names each layer's dictionary folder)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FeaturekitError(f"{folder} is not a transcoder set: {MANIFEST} is missing; pass the folder that "
                              "circuits.transcoder_set.save wrote, or the transcoders' dictionary folders one by one")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FeaturekitError(f"{manifest_path} is not a transcoder set manifest (format must be {FORMAT!r}); re-save the set")
    if manifest.get("kind") == KIND_CLT and manifest.get("format_version") == CLT_FORMAT_VERSION:
        return _load_clt(folder, manifest, manifest_path, device)
    if manifest.get("format_version") != FORMAT_VERSION or manifest.get("kind", KIND_PLT) != KIND_PLT:
        raise FeaturekitError(f"{manifest_path} has format_version {manifest.get('format_version')!r}; this featurekit "
                              f"reads version {FORMAT_VERSION} ({KIND_PLT}) and {CLT_FORMAT_VERSION} ({KIND_CLT}): "
                              "upgrade featurekit or re-save the set")
    entries = manifest.get("layers")
    if not isinstance(entries, list) or not entries:
        raise FeaturekitError(f"{manifest_path} lists no layers; re-save the set")
    transcoders: dict[int, Dictionary] = {}
    paths: dict[int, str] = {}
    for entry in entries:
        layer, rel = int(entry["layer"]), str(entry["path"])
        tc = fileformat.load(_inside(folder, rel, manifest_path, f"layer {layer}"), device=device)
        if _layer_of(tc, folder / rel) != layer:
            raise FeaturekitError(f"{manifest_path} lists {rel} under layer {layer} but it was trained on "
                                  f"{_sites(tc)[0]}; fix the manifest or re-save the set")
        transcoders[layer], paths[layer] = tc, str(folder / rel)
    return TranscoderSet(transcoders, manifest.get("model"), paths)


def _inside(folder: Path, rel: str, where: Path, what: str) -> Path:
    if Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise FeaturekitError(f"{where}: {what}'s path {rel!r} must stay inside the set folder")
    return folder / rel


def _load_clt(folder: Path, manifest: dict, manifest_path: Path, device: str | torch.device) -> CrossLayerSet:
    layers, rel = manifest.get("layers"), manifest.get("path")
    if not isinstance(layers, list) or not layers or not all(isinstance(x, int) for x in layers) or not isinstance(rel, str):
        raise FeaturekitError(f"{manifest_path}: a cross-layer set lists its model layers (integers) and the CLT's folder "
                              "(path); re-save the set")
    clt = fileformat.load(_inside(folder, rel, manifest_path, "the CLT"), device=device)
    if not isinstance(clt, CrossLayerTranscoder):
        raise FeaturekitError(f"{folder / rel} holds a {clt.method} dictionary, not a cross-layer transcoder (method 'clt')")
    return CrossLayerSet(clt, layers, manifest.get("model"), str(folder / rel))


def write_manifest(folder: str | Path, model: str | None, layers: Mapping[int, str]) -> Path:
    """The per-layer set's manifest (`layers`: layer → dictionary folder relative to `folder`), written atomically."""
    entries = [{"layer": int(layer), "path": rel} for layer, rel in sorted(layers.items())]
    atomic_write_json(Path(folder) / MANIFEST, {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": KIND_PLT,
                                                "model": model, "layers": entries})
    return Path(folder)


def save_clt(clt: CrossLayerTranscoder, layers: Sequence[int], folder: str | Path, model: str | None = None,
             metadata: Mapping | None = None) -> Path:
    """Write a CLT to `folder/clt` and its manifest (the manifest last: a folder with one is complete)."""
    tset = CrossLayerSet(clt, list(layers), model)
    folder = Path(folder)
    meta = {k: v for k, v in dict(metadata or getattr(clt, "metadata", None) or {}).items()
            if k in ("source", "special_tokens", "provenance", "normalization")}
    meta["source"] = {**meta.get("source", {}), "model": model, "site": "mlp_in", "output_site": "mlp_out",
                      "layers": tset.layers}
    fileformat.save(clt, folder / "clt", metadata=meta)
    atomic_write_json(folder / MANIFEST, {"format": FORMAT, "format_version": CLT_FORMAT_VERSION, "kind": KIND_CLT,
                                          "model": model, "layers": tset.layers, "path": "clt"})
    return folder


def save(tset: TranscoderSet | CrossLayerSet | Mapping[int, Dictionary], folder: str | Path, model: str | None = None) -> Path:
    """Write each transcoder to `folder/layer_L` and then the manifest (each file atomically; the manifest
    last, so a folder with a manifest is complete)."""
    if not isinstance(tset, (TranscoderSet, CrossLayerSet)):
        tset = TranscoderSet(dict(tset), model)
    folder = Path(folder)
    name = model if model is not None else tset.model
    if isinstance(tset, CrossLayerSet):
        return save_clt(tset.clt, tset.layers, folder, name)
    for layer, tc in tset.transcoders.items():
        meta = {k: v for k, v in (getattr(tc, "metadata", None) or {}).items()
                if k in ("source", "special_tokens", "provenance")}
        meta["source"] = {**meta.get("source", {}), "model": name, "site": f"mlp_in.{layer}", "output_site": f"mlp_out.{layer}"}
        fileformat.save(tc, folder / f"layer_{layer}", metadata=meta)
    return write_manifest(folder, name, {layer: f"layer_{layer}" for layer in tset.transcoders})
