"""Other libraries' dictionary files, mapped onto featurekit's registered methods (docs/interop.md).

    featurekit.load("runs/x/dictionary")                 # featurekit's own folder
    featurekit.load("path/to/saelens_folder")            # cfg.json + sae_weights.safetensors
    featurekit.load("path/to/sparsify_run/layers.6")     # cfg.json + sae.safetensors
    featurekit.load("path/to/params.npz")                # Gemma Scope
    featurekit.load("path/to/trainer_0")                 # dictionary_learning ae.pt + config.json
    featurekit.load("hf:ORG/REPO", subfolder="layer_6")  # any of these on the Hugging Face Hub

The result is the registered featurekit `Dictionary` the file maps onto; its `metadata` is shaped like
`featurekit.json` (source model and site, the library's hook name, and `provenance.imported_from`: format,
path, architecture and the conventions applied), so `featurekit.save` writes it as a featurekit folder.
`export_saelens` / `export_sparsify` write the other way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..dictionaries import fileformat
from ..errors import FeaturekitError
from . import dictlearning, gemmascope, saelens, sparsify
from .hub import download

FORMATS = ("featurekit", "saelens", "sparsify", "gemmascope", "dictionary_learning")


def detect(path: Path) -> str:
    """Which format the file or folder at `path` holds (a FeaturekitError listing what was looked for)."""
    if path.is_dir() and ((path / fileformat.META).is_file() or (path / fileformat.WEIGHTS).is_file()):
        return "featurekit"  # featurekit's loader names what is missing in its own folder
    if gemmascope.is_gemmascope(path):
        return "gemmascope"
    if dictlearning.is_dictlearning(path):
        return "dictionary_learning"
    if path.is_dir() and (path / "cfg.json").is_file():
        if (path / saelens.WEIGHTS).is_file():
            return "saelens"
        if (path / sparsify.WEIGHTS).is_file():
            return "sparsify"
    if not path.exists():
        raise FeaturekitError(f"{path} does not exist; pass a dictionary folder or file (or hf:ORG/REPO for the Hub)")
    hookpoints = sorted(p.name for p in path.iterdir() if p.is_dir() and sparsify.is_sparsify(p)) if path.is_dir() else []
    if hookpoints:
        raise FeaturekitError(f"{path} is a sparsify run with one coder per hookpoint {hookpoints}; pass one of them, "
                              f"e.g. {path / hookpoints[0]}")
    raise FeaturekitError(
        f"{path} is not a dictionary featurekit reads: featurekit.json is missing (a featurekit folder holds it beside "
        f"model.safetensors), and so are the files of the other formats: cfg.json + sae_weights.safetensors (SAELens), "
        f"cfg.json + sae.safetensors (sparsify), params.npz (Gemma Scope), ae.pt + config.json (dictionary_learning)")


def load(path: str | Path, device: str | torch.device = "cpu", *, subfolder: str | None = None, site: str | None = None,
         model: str | None = None, revision: str | None = None) -> Any:
    """Load a dictionary in any format `detect` knows, from a local path or `hf:ORG/REPO` (with `subfolder`).

    `site` / `model` fill in what a format does not record (Gemma Scope and sparsify files name no model)."""
    if isinstance(path, str) and path.startswith("hf:"):
        path = download(path.removeprefix("hf:"), subfolder=subfolder, revision=revision)
    else:
        path = Path(path) / subfolder if subfolder else Path(path)
    fmt = detect(path)
    if fmt == "featurekit":
        return fileformat.load(path, device=device)
    if fmt == "saelens":
        d = saelens.read(path, device)
    elif fmt == "sparsify":
        d = sparsify.read(path, device, model=model)
    elif fmt == "gemmascope":
        d = gemmascope.read(path, device, site=site, model=model)
    else:
        d = dictlearning.read(path, device)
    src = d.metadata.setdefault("source", {})
    if site is not None:
        src["site"] = site
    if model is not None:
        src["model"] = model
    return d


def export(dictionary: Any, fmt: str, out: str | Path) -> Path:
    """Write `dictionary` in another library's format ("saelens" or "sparsify") under `out`."""
    if fmt == "saelens":
        return saelens.export(dictionary, Path(out))
    if fmt == "sparsify":
        return sparsify.export(dictionary, Path(out))
    raise FeaturekitError(f"unknown export format {fmt!r}; choose saelens or sparsify")


__all__ = ["FORMATS", "detect", "export", "load"]
