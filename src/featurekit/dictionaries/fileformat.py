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

Weights are read with `safetensors` (no pickle). Every field the loader uses is checked (types,
the method, its hyper-parameters against the method's constructor), then the file's tensors against
the built dictionary's state (names and shapes) and for NaN/infinity, before any weight is used.
`save` refuses a dictionary holding NaN or infinite values.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._io import FileError, atomic_folder, atomic_write, atomic_write_json, read_json
from ..errors import FeaturekitError
from .base import Dictionary
from .registry import METHODS, method_class

FORMAT = "featurekit.dictionary"
FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
META = "featurekit.json"
DTYPES = ("float32", "bfloat16", "float16", "float64")
#: buffers whose ±inf is a meaning, not a divergence (NaN is refused in every tensor, ±inf in every parameter)
INFINITE_OK = {
    "window_peak",  # GBA: the window's running maximum, −inf before the window's first batch
    "multiplier",  # statistical TopK: −inf keeps every latent (k ≥ n_latents)
}



def build(method: str, d_in: int, n_latents: int, **hyperparams: Any) -> Dictionary:
    """Construct a dictionary by method name (the registry, `registry.METHODS`)."""
    return method_class(method)(d_in, n_latents, **hyperparams)


def build_from_config(cfg: Any, d_in: int, seed: int | None = None, d_out: int | None = None) -> Dictionary:
    """Construct from a `DictionaryConfig` (method, n_latents and the method's Params): the Params fields the
    constructor takes are passed on (fitter-only ones, e.g. SNMF's passes, are not), and `d_out`, the
    output width, to methods that predict another site (transcoders)."""
    cls = method_class(cfg.method)
    accepted = inspect.signature(cls.__init__).parameters
    params = {k: v for k, v in dataclasses.asdict(cfg.params).items() if k in accepted}
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
    bad = non_finite(dictionary, tensors)
    if bad:
        raise FeaturekitError(
            f"refusing to save a dictionary to {path}: {bad} hold NaN or infinite values (training diverged, or the "
            f"weights were edited); lower train.lr or check the activations and train again")
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
    with atomic_folder(path) as staging:
        atomic_write(staging / WEIGHTS, lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT}))
        atomic_write_json(staging / META, meta)
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
    except FileError:
        raise
    except FeaturekitError as err:
        raise FeaturekitError(f"{err}; re-save the dictionary") from err
    check_meta(meta, meta_path)
    return meta


def check_meta(meta: Any, meta_path: Path) -> None:
    """Check every field of `featurekit.json` that the loader uses; each error names the file, the field and the fix."""
    if not isinstance(meta, dict):
        raise FeaturekitError(f"{meta_path} must hold a JSON object describing the dictionary, got {type(meta).__name__}; "
                              "the file is damaged: re-save the dictionary")
    if meta.get("format") != FORMAT:
        raise FeaturekitError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}; pass a folder "
                              f"written by featurekit.save")
    _check_version(meta, meta_path)

    def bad(field: str, why: str) -> FeaturekitError:
        return FeaturekitError(f"{meta_path}: {field} {why}; the file is damaged or was edited by hand: re-save the dictionary")

    method = meta.get("method")
    if method not in METHODS:
        raise bad("method", f"is {method!r}, not one of {sorted(METHODS)}" if method is not None else "is missing")
    legacy = METHODS[method].legacy_names  # format v1 files name some hyper-parameters by their old config keys
    if isinstance(meta.get("hyperparams"), dict) and legacy:
        meta["hyperparams"] = {legacy.get(k, k): v for k, v in meta["hyperparams"].items()}
    for field in ("d_in", "n_latents", *(("d_out",) if "d_out" in meta else ())):
        value = meta.get(field)
        if type(value) is not int or value < 1:
            raise bad(field, "is missing" if value is None else f"must be a positive integer, got {value!r}")
    if meta.get("dtype", "float32") not in DTYPES:
        raise bad("dtype", f"is {meta['dtype']!r}, not one of {list(DTYPES)}")
    hyperparams = meta.get("hyperparams", {})
    if not isinstance(hyperparams, dict):
        raise bad("hyperparams", f"must be an object of constructor arguments, got {type(hyperparams).__name__}")
    accepted = sorted(set(inspect.signature(METHODS[method].__init__).parameters) - {"self", "d_in", "n_latents"})
    unknown = sorted(set(hyperparams) - set(accepted))
    if unknown:
        raise FeaturekitError(f"{meta_path}: hyperparams {unknown} are not parameters of method {method!r} "
                              f"(valid: {accepted}); remove them or re-save the dictionary")
    for key, value in hyperparams.items():
        want = _scalar_types(METHODS[method], key)
        if want and not _is_a(value, want):
            raise bad(f"hyperparams.{key}", f"must be {' or '.join(t.__name__ for t in want)}, got {value!r}")


def _check_version(meta: dict[str, Any], meta_path: Path) -> None:
    version = meta.get("format_version")
    if version is None:
        raise FeaturekitError(f"{meta_path} has no format_version; the file is damaged or incomplete: re-save the dictionary")
    if type(version) is not int or version < 1:
        raise FeaturekitError(f"{meta_path}: format_version must be a positive integer, got {version!r}; "
                              f"the file is damaged or was edited by hand: re-save the dictionary")
    if version > FORMAT_VERSION:
        raise FeaturekitError(
            f"{meta_path} has format version {version}, newer than this featurekit reads "
            f"({FORMAT_VERSION}); upgrade featurekit (pip install -U featurekit)"
        )


def _scalar_types(cls: type, name: str) -> tuple[type, ...]:
    """The scalar types (int, float, bool, str, None) constructor argument `name` is annotated with; () for others."""
    hint = typing.get_type_hints(cls.__init__).get(name)
    types = typing.get_args(hint) or (hint,)
    return types if all(t in (int, float, bool, str, type(None)) for t in types) else ()


def _is_a(value: Any, types: tuple[type, ...]) -> bool:
    if isinstance(value, float) and not math.isfinite(value):
        return False
    if isinstance(value, bool):
        return bool in types
    return isinstance(value, types) or (float in types and type(value) is int)


def non_finite(dictionary: Dictionary, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors holding NaN, or ±inf outside the buffers where it is a meaning (INFINITE_OK)."""
    params = {name for name, _ in dictionary.named_parameters()}
    bad = []
    for name, t in tensors.items():
        if not t.is_floating_point() or bool(torch.isfinite(t).all()):
            continue
        inf_ok = name not in params and name.rsplit(".", 1)[-1] in INFINITE_OK
        if bool(torch.isnan(t).any()) or not inf_ok:
            bad.append(name)
    return bad


def _check_tensors(dictionary: Dictionary, tensors: dict[str, torch.Tensor], weights: Path) -> None:
    """The file's tensors against the built dictionary's state: the same names and shapes, finite values."""
    want = {k: tuple(v.shape) for k, v in dictionary.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = [f"missing {sorted(set(want) - set(got))}"] if set(want) - set(got) else []
    problems += [f"unexpected {sorted(set(got) - set(want))}"] if set(got) - set(want) else []
    problems += [f"{k} has shape {got[k]} where {META} needs {want[k]}" for k in sorted(set(want) & set(got)) if got[k] != want[k]]
    if problems:
        meta = dictionary.metadata
        says = f"method {meta['method']}, d_in {meta['d_in']}, n_latents {meta['n_latents']}"
        raise FeaturekitError(f"{weights} does not match {weights.with_name(META)} ({says}): {'; '.join(problems)}; "
                              f"the two files do not belong together, re-save the dictionary")
    bad = non_finite(dictionary, tensors)
    if bad:
        raise FeaturekitError(f"{weights}: the tensors {bad} hold NaN or infinite values; this dictionary cannot run "
                              f"(its training diverged or the file is damaged): train it again")


def _build(meta: dict[str, Any], meta_path: Path) -> Dictionary:
    try:
        dictionary = build(meta["method"], meta["d_in"], meta["n_latents"], **meta.get("hyperparams", {}))
    except FeaturekitError as err:
        raise FeaturekitError(f"{meta_path}: {err}; the file was edited by hand or is damaged: re-save the dictionary") from err
    except (TypeError, ValueError, RuntimeError) as err:
        raise FeaturekitError(f"{meta_path}: method {meta['method']!r} cannot be built from hyperparams "
                              f"{meta.get('hyperparams', {})} ({err}); re-save the dictionary") from err
    dictionary.metadata = meta
    return dictionary


def from_tensors(meta: dict[str, Any], tensors: dict[str, torch.Tensor], where: Path,
                 device: str | torch.device = "cpu") -> Dictionary:
    """A dictionary from a `featurekit.json`-shaped `meta` and its state tensors, with every check `load` makes
    (`interop` maps other libraries' files onto these; `where` names the file in errors)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **meta}
    check_meta(meta, where)
    dictionary = _build(meta, where)
    _check_tensors(dictionary, tensors, where)
    dictionary.load_state_dict(tensors)
    dictionary.to(device=device, dtype=getattr(torch, meta.get("dtype", "float32")))
    return dictionary.eval()


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
    dictionary = _build(meta, path / META)
    _check_tensors(dictionary, tensors, weights)
    dictionary.load_state_dict(tensors)
    dictionary.to(device=device, dtype=getattr(torch, meta.get("dtype", "float32")))
    return dictionary.eval()
