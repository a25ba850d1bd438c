"""What every reader shares: reading tensors and configs with errors that name the file, moving the encoder's
centring between conventions, and building the registered featurekit dictionary a foreign file maps onto."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import __version__
from .._io import read_json
from ..dictionaries.fileformat import from_tensors
from ..errors import FeaturekitError


def read_config(path: Path, fmt: str) -> dict[str, Any]:
    """A JSON object from `path` (a missing, damaged or non-object file → FeaturekitError naming it)."""
    if not path.is_file():
        raise FeaturekitError(f"{path} is missing; a {fmt} dictionary folder holds it beside its weights")
    cfg = read_json(path)
    if not isinstance(cfg, dict):
        raise FeaturekitError(f"{path} must hold a JSON object (the {fmt} config), got {type(cfg).__name__}; the file is damaged")
    return cfg


def read_safetensors(path: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, as float32 on the CPU (a missing or damaged file → FeaturekitError)."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FeaturekitError(f"{path} is missing; a {fmt} dictionary folder holds its weights there")
    try:
        tensors = load_file(path)
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise FeaturekitError(f"{path} cannot be read as safetensors ({err}); the file is damaged or truncated: "
                              f"download or save it again") from err
    return {k: v.float() for k, v in tensors.items()}


def need(tensors: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], where: Path, what: str) -> None:
    """Every tensor in `shapes` is present with that shape (an error lists what is missing or mis-shaped)."""
    missing = sorted(set(shapes) - set(tensors))
    wrong = [f"{k} has shape {tuple(tensors[k].shape)}, expected {shape}" for k, shape in shapes.items()
             if k in tensors and tuple(tensors[k].shape) != shape]
    if missing or wrong:
        problems = ([f"missing {missing}"] if missing else []) + wrong
        raise FeaturekitError(f"{where} does not hold a {what}: {'; '.join(problems)}; the file is damaged, or its config "
                              f"does not belong to these weights")
    bad = sorted(k for k in shapes if not bool(torch.isfinite(tensors[k]).all()))
    if bad:
        raise FeaturekitError(f"{where}: the tensors {bad} hold NaN or infinite values; this dictionary cannot run")


def shape_of(tensors: dict[str, torch.Tensor], name: str, ndim: int, where: Path, fmt: str) -> tuple[int, ...]:
    """The shape of tensor `name`, which must exist with `ndim` dimensions (its sizes fix d_in / d_sae)."""
    if name not in tensors:
        raise FeaturekitError(f"{where} has no tensor {name!r} (it holds {sorted(tensors)}); not a {fmt} dictionary, "
                              f"or the file is damaged")
    shape = tuple(tensors[name].shape)
    if len(shape) != ndim:
        raise FeaturekitError(f"{where}: {name} has shape {shape}, a {fmt} file stores it with {ndim} dimension(s)")
    return shape


def centred_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """b_enc of the centred form: x W_encᵀ + b_enc = (x − b_dec) W_encᵀ + (b_enc + W_enc b_dec), W_enc (F, d)."""
    return (b_enc.double() + W_enc.double() @ b_dec.double()).float()


def uncentred_bias(W_enc: torch.Tensor, b_enc: torch.Tensor, b_dec: torch.Tensor) -> torch.Tensor:
    """b_enc of the uncentred form: (x − b_dec) W_encᵀ + b_enc = x W_encᵀ + (b_enc − W_enc b_dec)."""
    return (b_enc.double() - W_enc.double() @ b_dec.double()).float()


def assemble(method: str, d_in: int, n_latents: int, hyperparams: dict[str, Any], state: dict[str, torch.Tensor],
             where: Path, origin: dict[str, Any], source: dict[str, Any], device: str | torch.device = "cpu",
             d_out: int | None = None) -> Any:
    """The registered featurekit dictionary `method` holding `state` (its own tensor names), with metadata as
    `featurekit.json` would hold it: `source` (model, site, the library's hook name) and `provenance.imported_from`
    (`origin`: format, path, architecture, the conventions applied). The tensors are checked as `load` checks them."""
    meta: dict[str, Any] = {
        "method": method, "d_in": d_in, "n_latents": n_latents, **({"d_out": d_out} if d_out is not None else {}),
        "dtype": "float32", "hyperparams": hyperparams,
        "source": {k: v for k, v in source.items() if v is not None},
        "provenance": {"featurekit_version": __version__, "imported_from": {**origin, "path": str(where)}},
    }
    dictionary = from_tensors(meta, state, where, device=device)
    dictionary.metadata.update({
        "inference_rule": dictionary.inference_rule(),
        "normalization": {**dictionary.scales(), "folded": True, "rule": origin.get("normalization", "none")},
    })
    return dictionary
