"""A transcoder set: one transcoder per layer, layer L reading `mlp_in.L` and predicting `mlp_out.L`.

On disk a set is a folder holding one featurekit dictionary folder per layer and a manifest,

    SET/transcoder_set.json   {"format": "featurekit-transcoder-set", "format_version": 1,
                               "model": "<model name or null>",
                               "layers": [{"layer": 0, "path": "layer_0"}, ...]}
    SET/layer_0/              model.safetensors + featurekit.json (fileformat.save)

paths relative to SET. Each dictionary's own file says which sites it was trained on
(`source.site`, `source.output_site`); a set refuses a dictionary that is not a transcoder or whose
sites are not `mlp_in.L` → `mlp_out.L` for the layer it is listed under.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import atomic_write_json, read_json
from ..dictionaries import Dictionary, fileformat
from ..errors import FeaturekitError

MANIFEST = "transcoder_set.json"
FORMAT = "featurekit-transcoder-set"
FORMAT_VERSION = 1


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
                + "; train a transcoder (mlp_in.L → mlp_out.L) for every layer of this model")

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


def load(folder: str | Path, device: str | torch.device = "cpu") -> TranscoderSet:
    """Read a set folder written by `save` (its manifest names each layer's dictionary folder)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise FeaturekitError(f"{folder} is not a transcoder set: {MANIFEST} is missing; pass the folder that "
                              "circuits.transcoder_set.save wrote, or the transcoders' dictionary folders one by one")
    manifest = read_json(manifest_path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise FeaturekitError(f"{manifest_path} is not a transcoder set manifest (format must be {FORMAT!r}); re-save the set")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FeaturekitError(f"{manifest_path} has format_version {manifest.get('format_version')!r}; this featurekit "
                              f"reads version {FORMAT_VERSION}: upgrade featurekit or re-save the set")
    entries = manifest.get("layers")
    if not isinstance(entries, list) or not entries:
        raise FeaturekitError(f"{manifest_path} lists no layers; re-save the set")
    transcoders: dict[int, Dictionary] = {}
    paths: dict[int, str] = {}
    for entry in entries:
        layer, rel = int(entry["layer"]), str(entry["path"])
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise FeaturekitError(f"{manifest_path}: layer {layer}'s path {rel!r} must stay inside the set folder")
        tc = fileformat.load(folder / rel, device=device)
        if _layer_of(tc, folder / rel) != layer:
            raise FeaturekitError(f"{manifest_path} lists {rel} under layer {layer} but it was trained on "
                                  f"{_sites(tc)[0]}; fix the manifest or re-save the set")
        transcoders[layer], paths[layer] = tc, str(folder / rel)
    return TranscoderSet(transcoders, manifest.get("model"), paths)


def save(tset: TranscoderSet | Mapping[int, Dictionary], folder: str | Path, model: str | None = None) -> Path:
    """Write each transcoder to `folder/layer_L` and then the manifest (each file atomically; the manifest
    last, so a folder with a manifest is complete)."""
    if not isinstance(tset, TranscoderSet):
        tset = TranscoderSet(dict(tset), model)
    folder = Path(folder)
    name = model if model is not None else tset.model
    entries = []
    for layer, tc in tset.transcoders.items():
        meta = {k: v for k, v in (getattr(tc, "metadata", None) or {}).items()
                if k in ("source", "special_tokens", "provenance")}
        meta["source"] = {**meta.get("source", {}), "model": name, "site": f"mlp_in.{layer}", "output_site": f"mlp_out.{layer}"}
        fileformat.save(tc, folder / f"layer_{layer}", metadata=meta)
        entries.append({"layer": layer, "path": f"layer_{layer}"})
    atomic_write_json(folder / MANIFEST, {"format": FORMAT, "format_version": FORMAT_VERSION, "model": name, "layers": entries})
    return folder
