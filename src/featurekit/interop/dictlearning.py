"""dictionary_learning (saprmarks/dictionary_learning) trainer folders: `ae.pt` (a state dict) + `config.json`
(`{"trainer": {"dict_class": ..., "k": ..., "layer": ..., "lm_name": ...}, "buffer": {...}}`).

`ae.pt` is read with `torch.load(weights_only=True)`: tensors only, a pickle holding code is refused."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import FeaturekitError

WEIGHTS = "ae.pt"
CONFIG = "config.json"
FORMAT = "dictionary_learning"


def is_dictlearning(path: Path) -> bool:
    return path.is_dir() and (path / WEIGHTS).is_file()


def read_state(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch-saved state dict, without running code (weights_only=True)."""
    import pickle
    import zipfile

    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise FeaturekitError(f"{file} holds more than tensors (a pickle that would run code or build objects: {err}); "
                              f"refused: featurekit never unpickles code. Re-save it as a state dict of tensors "
                              f"(torch.save(ae.state_dict(), ...)) with a trusted dictionary_learning install") from err
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as err:
        raise FeaturekitError(f"{file} cannot be read ({type(err).__name__}: {err}); the file is damaged or truncated") from err
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FeaturekitError(f"{file} is not a state dict of tensors (got {type(state).__name__}); not a dictionary_learning ae.pt")
    return state


def read(path: Path, device: str | torch.device = "cpu") -> Any:
    raise FeaturekitError(f"{path}: reading dictionary_learning folders is not implemented yet")
