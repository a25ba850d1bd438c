"""The dictionary file: a folder with `model.safetensors` and `featurekit.json`.

`featurekit.json` says everything needed to run the weights correctly from the files alone:

    format, format_version   "featurekit.dictionary", an integer (newer than ours → clear error)
    method                   registry key ("topk", "relu", ...)
    d_in, n_latents, dtype   shapes and storage dtype (transcoders also d_out, the width of W_dec's rows)
    hyperparams              constructor arguments (e.g. k, l1_coefficient)
    inference_rule           what runs at inference (activation and its parameters)
    normalization            {"input_scale": c used in training, "folded": bool, "rule": str}
                             folded=true: weights run on raw activations (input_scale buffer is 1);
                             transcoders also record "output_scale" (c_out of the target y)
    source                   {"model", "site", "d_model", ...} where the activations came from
                             (transcoders: "output_site", the site whose activation they predict)
    special_tokens           the token policy used to build the training set
    provenance               featurekit version, tokens seen, steps, date, config digest

Weights are read with `safetensors` (no pickle). The shapes in the JSON are checked against the
tensors before anything is built.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_write, atomic_write_json, read_json
from ..errors import FeaturekitError
from .base import Dictionary
from .batchtopk import BatchAbsTopKSAE, BatchTopKSAE
from .choice import FeatureChoiceSAE, MutualChoiceSAE
from .gba import GBASAE
from .gsae import GradientSAE
from .itda import ITDADictionary
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .mpsae import MPSAE
from .relu import ReLUSAE
from .snmf import SNMFDictionary
from .topafa import TopAFASAE
from .topk import AbsTopKSAE, TopKSAE
from .transcoder import SkipTranscoder, Transcoder
from .vsae import VariationalSAE

FORMAT = "featurekit.dictionary"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "featurekit.json"

METHODS: dict[str, type[Dictionary]] = {
    cls.method: cls for cls in (TopKSAE, BatchTopKSAE, AbsTopKSAE, BatchAbsTopKSAE, JumpReLUSAE, ReLUSAE, GradientSAE,
                            MatryoshkaSAE, FeatureChoiceSAE, MutualChoiceSAE,
                            TopAFASAE, VariationalSAE, MPSAE, GBASAE,
                            Transcoder, SkipTranscoder, ITDADictionary, SNMFDictionary)
}


def build(method: str, d_in: int, n_latents: int, **hyperparams: Any) -> Dictionary:
    """Construct a dictionary by method name."""
    if method not in METHODS:
        raise FeaturekitError(f"unknown dictionary method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method](d_in, n_latents, **hyperparams)


def build_from_config(cfg: Any, d_in: int, seed: int | None = None, d_out: int | None = None) -> Dictionary:
    """Construct from a `DictionaryConfig`: its fields that the method's constructor takes are passed on
    (and `d_out`, the output width, to methods that predict another site: transcoders)."""
    if cfg.method not in METHODS:
        raise FeaturekitError(f"unknown dictionary method {cfg.method!r}; choose one of {sorted(METHODS)}")
    cls = METHODS[cfg.method]
    accepted = inspect.signature(cls.__init__).parameters
    params = {k: v for k, v in vars(cfg).items() if k in accepted and k not in ("d_in", "n_latents")}
    if d_out is not None:
        if "d_out" not in accepted:
            raise FeaturekitError(f"method {cfg.method!r} reconstructs its input; it takes no output width d_out")
        params["d_out"] = d_out
    return cls(d_in, cfg.n_latents, seed=seed, **params)


def save(dictionary: Dictionary, path: str | Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write `path/model.safetensors` and `path/featurekit.json` (each atomically).

    `metadata` may hold `source`, `special_tokens`, `provenance` and `normalization.rule`.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    tensors = {k: v.detach().contiguous().cpu() for k, v in dictionary.state_dict().items()}
    dtype = str(dictionary.W_dec.dtype).removeprefix("torch.")
    scales = dictionary.scales()
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": dictionary.method,
        "d_in": dictionary.d_in,
        "n_latents": dictionary.n_latents,
        **({"d_out": int(dictionary.W_dec.shape[1])} if dictionary.transcodes else {}),
        "dtype": dtype,
        "hyperparams": dictionary.hyperparams(),
        "inference_rule": dictionary.inference_rule(),
        "normalization": {
            **scales,
            "folded": all(v == 1.0 for v in scales.values()),
            **metadata.pop("normalization", {}),
        },
        **dictionary.file_metadata(),
        **metadata,
    }
    # Both files go into a fresh sibling folder that then replaces `path`, so a reader never sees
    # new weights beside an old featurekit.json (or the reverse).
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        atomic_write(staging / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
        atomic_write_json(staging / META, meta)
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(staging, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    """Read and validate `featurekit.json`."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise FeaturekitError(
            f"{path} is not a featurekit dictionary: {META} is missing; pass the folder that "
            f"`featurekit train` wrote (it holds {WEIGHTS} and {META})"
        )
    try:
        meta = read_json(meta_path)
    except json.JSONDecodeError as err:
        raise FeaturekitError(f"{meta_path} is not valid JSON ({err}); the file is damaged, re-save the dictionary") from err
    if meta.get("format") != FORMAT:
        raise FeaturekitError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise FeaturekitError(
            f"{meta_path} has format version {version}, newer than this featurekit reads "
            f"({FORMAT_VERSION}); upgrade featurekit (pip install -U featurekit)"
        )
    return meta


def load(path: str | Path, device: str | torch.device = "cpu") -> Dictionary:
    """Load a dictionary folder written by `save`; runs correctly from the files alone."""
    path = Path(path)
    meta = read_meta(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FeaturekitError(f"{weights} is missing; the dictionary folder is incomplete, re-save it")
    try:
        tensors = load_file(weights, device=str(device))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise FeaturekitError(f"{weights} cannot be read ({err}); the file is damaged, re-save the dictionary") from err
    expected = {"W_enc": (meta["n_latents"], meta["d_in"]), "W_dec": (meta["n_latents"], meta.get("d_out", meta["d_in"]))}
    for name in ("W_enc", "W_dec"):
        if name not in tensors or tuple(tensors[name].shape) != expected[name]:
            got = tuple(tensors[name].shape) if name in tensors else "missing"
            raise FeaturekitError(
                f"{weights}: {name} has shape {got} but {META} says {expected[name]}; the two files do not "
                f"belong together, re-save the dictionary"
            )
    dictionary = build(meta["method"], meta["d_in"], meta["n_latents"], **meta.get("hyperparams", {}))
    dictionary.load_state_dict(tensors)
    dictionary.to(device=device, dtype=getattr(torch, meta.get("dtype", "float32")))
    dictionary.metadata = meta
    return dictionary.eval()
