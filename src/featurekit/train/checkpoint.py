"""Checkpoints: everything needed to continue a run exactly, with no pickle.

A checkpoint is a folder `checkpoint/` holding `state.safetensors` (the dictionary's tensors,
the optimiser's per-parameter tensors, the dead-latent counters, the torch RNG state) and
`state.json` (step, tokens, scalar optimiser state, the config digest). Both files are written
atomically, the JSON last; `state.json` names the tensor file's checksum, so a half-written
pair is detected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_write, atomic_write_json, read_json, sha256_file
from ..errors import FeaturekitError

TENSORS = "state.safetensors"
META = "state.json"


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(folder / TENSORS, lambda tmp: save_file(flat, tmp))
    atomic_write_json(folder / META, {**meta, "tensors_sha256": sha256_file(folder / TENSORS)})


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta_path, tensor_path = folder / META, folder / TENSORS
    if not meta_path.is_file() or not tensor_path.is_file():
        raise FeaturekitError(f"no checkpoint in {folder}; a run can only resume after its first checkpoint")
    meta = read_json(meta_path)
    if sha256_file(tensor_path) != meta.get("tensors_sha256"):
        raise FeaturekitError(
            f"{tensor_path} does not match {meta_path} (damaged or from another checkpoint); delete "
            f"{folder} to restart the run from scratch"
        )
    return load_file(tensor_path), meta


def optimizer_tensors(opt: torch.optim.Optimizer, names: dict[torch.nn.Parameter, str]) -> tuple[dict, dict]:
    """Split Adam's state into tensors (keyed `opt.NAME.KEY`) and JSON scalars."""
    tensors, scalars = {}, {}
    for param, state in opt.state.items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"opt.{names[param]}.{key}"] = value
            else:
                scalars[f"{names[param]}.{key}"] = value
    return tensors, scalars


def restore_optimizer(opt: torch.optim.Optimizer, named: dict[str, torch.nn.Parameter], tensors: dict, scalars: dict) -> None:
    for name, param in named.items():
        state = {}
        prefix = f"opt.{name}."
        for key, value in tensors.items():
            if key.startswith(prefix):
                state[key[len(prefix):]] = value.to(param.device)
        for key, value in scalars.items():
            if key.startswith(name + "."):
                state[key[len(name) + 1:]] = value
        if state:
            opt.state[param] = state
