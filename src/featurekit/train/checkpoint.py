"""Checkpoints: everything needed to continue a run exactly, with no pickle.

A checkpoint folder holds `state-STEP.safetensors` (the dictionary's tensors, the optimiser's
per-parameter tensors, the dead-latent counters, the torch RNG state) and `state.json` (step,
tokens, scalar optimiser state, the config digest, and the name and sha256 of its tensor file).
The tensor file is written first under a new name, then `state.json` is atomically replaced, then
older tensor files are deleted: a crash at any point leaves the previous or the new checkpoint
whole, never a mix.

Reading checks `state.json` (JSON object, the fields below with their types) and the tensor file's
digest; a damaged checkpoint raises FeaturekitError naming the folder and the way out (delete it to
restart the run).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .._io import FileError, atomic_write, atomic_write_json, read_json, sha256_file
from ..errors import FeaturekitError

META = "state.json"
TENSOR_FILE = re.compile(r"state-\d{9,}\.safetensors")
#: fields of state.json and their types: every checkpoint's, then the gradient trainer's (no `kind`)
FIELDS: dict[str, type | tuple[type, ...]] = {"step": int, "tokens": int, "tensors": str, "tensors_sha256": str}
TRAINER_FIELDS: dict[str, type | tuple[type, ...]] = {"total_steps": int, "digest": str, "optimizer_scalars": dict}
OPTIONAL_FIELDS: dict[str, type | tuple[type, ...]] = {"kind": str, "digest": str, "threads": (int, type(None))}


def save_checkpoint(folder: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    name = f"state-{meta['step']:09d}.safetensors"
    # written from the tensors' own memory (safetensors' `save` would build the file in memory twice: at
    # 32,768 latents the weights and Adam moments are 450 MB, so a checkpoint cost ≈ 900 MB of peak memory)
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fresh = not (folder / name).exists()
    atomic_write(folder / name, lambda tmp: save_file(flat, tmp))
    try:
        atomic_write_json(folder / META, {**meta, "tensors": name, "tensors_sha256": sha256_file(folder / name)})
    except BaseException:
        if fresh:  # state.json still names the previous checkpoint, which stays whole; free the disk of the new one
            (folder / name).unlink(missing_ok=True)
        raise
    for old in folder.glob("state-*.safetensors"):
        if old.name != name:
            old.unlink()


def read_checkpoint_meta(folder: Path) -> dict[str, Any] | None:
    """`state.json` of the checkpoint in `folder`, checked; None when there is none."""
    path = folder / META
    if not path.is_file():
        return None
    try:
        meta = read_json(path)
    except FileError:
        raise
    except FeaturekitError as err:  # not JSON (truncated, empty), not UTF-8, a key twice
        raise damaged(folder, str(err)) from err
    check_meta(meta, folder)
    return meta


def check_meta(meta: Any, folder: Path) -> None:
    """The fields of `state.json` with their types; a wrong one means the checkpoint is damaged."""
    if not isinstance(meta, dict):
        raise damaged(folder, f"{folder / META} holds a JSON {type(meta).__name__}, not an object")
    fields = {**FIELDS, **({} if meta.get("kind") == "fitter" else TRAINER_FIELDS)}
    absent = [key for key in fields if key not in meta]
    if absent:
        raise damaged(folder, f"{folder / META} has no {absent[0]!r}")
    for key, kind in {**OPTIONAL_FIELDS, **fields}.items():
        value = meta.get(key, None)
        if key in meta and (not isinstance(value, kind) or isinstance(value, bool)):
            raise damaged(folder, f"{key!r} in {folder / META} must be {_type_name(kind)}, got {value!r:.60}")
    for key in ("step", "tokens", "total_steps"):
        if meta.get(key, 0) < 0:
            raise damaged(folder, f"{key!r} in {folder / META} is negative ({meta[key]})")
    if not TENSOR_FILE.fullmatch(meta["tensors"]):
        raise damaged(folder, f"'tensors' in {folder / META} must name a state-STEP.safetensors file, got {meta['tensors']!r:.60}")


def damaged(folder: Path, why: str) -> FeaturekitError:
    return FeaturekitError(f"the checkpoint folder {folder} is damaged ({why}); it cannot be resumed: delete {folder} "
                           f"to restart the run from the beginning (or start afresh under a new run name)")


def _type_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else {"int": "an integer", "str": "a string", "dict": "an object"}[k.__name__]
                       for k in kinds)


def load_checkpoint(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    meta = read_checkpoint_meta(folder)
    if meta is None:
        raise FeaturekitError(f"no checkpoint in {folder}; a run can only resume after its first checkpoint")
    tensor_path = folder / meta["tensors"]
    if not tensor_path.is_file() or sha256_file(tensor_path) != meta["tensors_sha256"]:
        raise damaged(folder, f"{tensor_path.name} is missing or does not match {META}'s sha256")
    try:
        return load_file(tensor_path), meta
    except Exception as err:  # safetensors' own error types for a file it cannot parse
        raise damaged(folder, f"{tensor_path.name} cannot be read: {err}") from err


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
