"""Checkpoints: everything needed to continue a run exactly, with no pickle.

A checkpoint folder holds `state-STEP.safetensors` (the dictionary's tensors, the optimiser's
per-parameter tensors, the dead-latent counters, the torch RNG state) and `state.json` (step,
tokens, scalar optimiser state, the config digest, and the name and sha256 of its tensor file).
The tensor file is written first under a new name, then `state.json` is atomically replaced, then
older tensor files are deleted: a crash at any point leaves the previous or the new checkpoint
whole, never a mix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._io import atomic_write, atomic_write_json, read_json, sha256_file
from ..errors import FeaturekitError

META = "state.json"


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"state-{meta['step']:09d}.safetensors"
    # written from the tensors' own memory (safetensors' `save` would build the file in memory twice: at
    # 32,768 latents the weights and Adam moments are 450 MB, so a checkpoint cost ≈ 900 MB of peak memory)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(folder / name, lambda tmp: save_file(flat, tmp))
    atomic_write_json(folder / META, {**meta, "tensors": name, "tensors_sha256": sha256_file(folder / name)})
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def read_checkpoint_meta(folder: Path) -> dict[str, Any] | None:
    path = folder / META
    return read_json(path) if path.is_file() else None


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = read_checkpoint_meta(folder)
    if meta is None:
        raise FeaturekitError(f"no checkpoint in {folder}; a run can only resume after its first checkpoint")
    tensor_path = folder / meta["tensors"]
    if not tensor_path.is_file() or sha256_file(tensor_path) != meta["tensors_sha256"]:
        raise FeaturekitError(
            f"{tensor_path} is missing or does not match {folder / META} (damaged); delete {folder} to restart the run"
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
