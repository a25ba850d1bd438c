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

Feature stores of a per-layer set's transcoders (`featurekit circuits features`, `pipeline.set_features`) are
run folders beside the layers, which `featurekit serve` reads as runs and links to a graph's feature nodes:

    SET/stores/layer_L/       config.json (naming ../../layer_L as its dictionary) + features.sqlite

(format_version 2 only for this kind, so an older featurekit says it cannot read it). `load` returns a
`TranscoderSet` or a `CrossLayerSet` (`sets.py`, which also says what the circuits code asks of a set; both, and
the partial sets of `partial_set.py`, are importable from here too).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from .._io import atomic_write_json, read_json
from ..dictionaries import CrossLayerTranscoder, Dictionary, fileformat
from ..errors import FeaturekitError
from .partial_set import NO_TRANSCODER, PartialSet, partial
from .sets import KIND_CLT, KIND_PLT, AnySet, CrossLayerSet, TranscoderSet, sites_of

__all__ = ["MANIFEST", "NO_TRANSCODER", "AnySet", "CrossLayerSet", "PartialSet", "TranscoderSet", "from_folders", "load",
           "layer_folders", "partial", "save", "save_clt", "store_folder", "write_manifest"]

MANIFEST = "transcoder_set.json"
STORES = "stores"  # SET/stores/layer_L: the feature store run of SET/layer_L (module docstring)
FORMAT = "featurekit-transcoder-set"
FORMAT_VERSION = 1
CLT_FORMAT_VERSION = 2  # the cross_layer_transcoder kind


def _layer_of(tc: Dictionary, where: Path) -> int:
    site, out = sites_of(tc)
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
                                  f"{sites_of(tc)[0]}; fix the manifest or re-save the set")
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


def layer_folders(folder: str | Path) -> dict[int, Path]:
    """layer → dictionary folder of a per-layer set folder: those its manifest lists, or, for a set whose training
    is still going on (no manifest yet), every finished `layer_L` folder (train-set moves a layer there when done)."""
    folder = Path(folder)
    if (folder / MANIFEST).is_file():
        manifest = read_json(folder / MANIFEST)
        if isinstance(manifest, dict) and manifest.get("kind") == KIND_CLT:
            raise FeaturekitError(f"{folder} is a cross-layer transcoder set; feature stores are built for per-layer sets only "
                                  "(a CLT's latents write to several layers)")
        entries = manifest.get("layers") if isinstance(manifest, dict) else None
        if not isinstance(entries, list) or not entries:
            raise FeaturekitError(f"{folder / MANIFEST} lists no layers; re-save the set")
        return {int(e["layer"]): _inside(folder, str(e["path"]), folder / MANIFEST, f"layer {e['layer']}") for e in entries}
    found = {int(p.name[6:]): p for p in folder.glob("layer_*")
             if p.name[6:].isdigit() and (p / fileformat.META).is_file() and (p / fileformat.WEIGHTS).is_file()}
    if not found:
        raise FeaturekitError(f"{folder} is not a transcoder set: no {MANIFEST} and no finished layer_L folders; pass the "
                              "folder that `featurekit circuits train-set` writes")
    return dict(sorted(found.items()))


def store_folder(layer_folder: str | Path) -> Path:
    """The default feature store run of the set's transcoder in `layer_folder`: SET/stores/layer_L."""
    layer_folder = Path(layer_folder)
    return layer_folder.parent / STORES / layer_folder.name
