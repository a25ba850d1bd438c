"""dictionary_learning (saprmarks/dictionary_learning) trainer folders: `ae.pt` (a state dict) + `config.json`
(`{"trainer": {"dict_class": ..., "k": ..., "layer": ..., "lm_name": ..., "submodule_name": ...}, "buffer": {...}}`),
read as that library's `utils.load_dictionary` runs them (`dictionary.py`, `trainers/*.py`):

    dict_class              its encode                                       featurekit method
    AutoEncoder             ReLU(enc(x − bias)), decoder rows unit-normed    relu (bias moved into b_enc; norms folded)
                            on load (function-preserving)
    AutoEncoderNew          ReLU(enc(x)), decoder with its own bias          relu
    AutoEncoderTopK         TopK(ReLU(enc(x − b_dec)))                       topk
    BatchTopKSAE            ReLU(π)·1[ReLU(π) > θ], θ a scalar               batchtopk (θ < 0, never tracked: 0)
    MatryoshkaBatchTopKSAE  as BatchTopKSAE; group_sizes                     matryoshka (prefixes = cumulative sizes)
    JumpReluAutoEncoder     ReLU(π·1[π > θ]), π = x W_enc + b_enc            jumprelu (b_dec moved into b_enc; θ<0 → 0)
    GatedAutoEncoder        —                                                refused (no gated method)

`ae.pt` is read with `torch.load(weights_only=True)`: tensors only, a pickle holding code is refused."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..errors import FeaturekitError
from .common import assemble, centred_bias, need, read_config, uncentred_bias

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
    """The featurekit dictionary a dictionary_learning trainer folder maps onto (module docstring)."""
    cfg = read_config(path / CONFIG, FORMAT)
    trainer = cfg.get("trainer") if isinstance(cfg.get("trainer"), dict) else {}
    cls = trainer.get("dict_class")
    if cls not in _READERS:
        known = sorted(_READERS)
        why = "featurekit has no gated SAE" if cls == "GatedAutoEncoder" else f"featurekit reads {known}"
        raise FeaturekitError(f"{path / CONFIG}: dictionary_learning dict_class {cls!r} does not map onto a featurekit method ({why})")
    file = path / WEIGHTS
    t = {k: v.float() if v.is_floating_point() else v for k, v in read_state(file).items()}
    method, hyper, state, conventions = _READERS[cls](t, trainer, file)
    d_in, n = state["W_dec"].shape[1], state["W_dec"].shape[0]
    state["input_scale"] = torch.ones(())
    layer, sub = trainer.get("layer"), trainer.get("submodule_name")
    m = re.match(r"^(resid_post|resid_pre|mlp_out|attn_out|mlp_in)_layer_(\d+)$", sub or "")
    source = {"model": trainer.get("lm_name"), "site": f"{m.group(1)}.{m.group(2)}" if m else None,
              "submodule_name": sub, "layer": layer, "d_model": d_in}
    origin = {"format": FORMAT, "architecture": cls, "trainer": trainer.get("trainer_class"), "conventions": conventions}
    return assemble(method, d_in, n, hyper, state, path, origin, source, device)


def _k(t: dict, trainer: dict, file: Path) -> int:
    k = int(t["k"]) if "k" in t else trainer.get("k")
    if type(k) is not int or k < 1:
        raise FeaturekitError(f"{file}: no positive k in the state dict or config.json (got {k!r}); the file is damaged")
    return k


def _linear(t: dict, file: Path, what: str, dec_bias: str) -> tuple[int, int]:
    n, d = tuple(t["encoder.weight"].shape) if "encoder.weight" in t and t["encoder.weight"].ndim == 2 else (0, 0)
    need(t, {"encoder.weight": (n, d), "encoder.bias": (n,), "decoder.weight": (d, n), dec_bias: (d,)}, file, what)
    if n == 0:
        raise FeaturekitError(f"{file}: no two-dimensional encoder.weight; not a dictionary_learning {what}")
    return n, d


def _autoencoder(t: dict, trainer: dict, file: Path):
    _linear(t, file, "AutoEncoder", "bias")
    W_enc, W_dec = t["encoder.weight"], t["decoder.weight"].T.contiguous()
    b_enc = uncentred_bias(W_enc, t["encoder.bias"], t["bias"])
    norms = W_dec.norm(dim=1).clamp_min(1e-12)  # load_dictionary unit-normalises the decoder (function-preserving)
    state = {"W_enc": W_enc * norms[:, None], "b_enc": b_enc * norms, "W_dec": W_dec / norms[:, None], "b_dec": t["bias"]}
    return "relu", {}, state, ["bias subtracted before the encoder: moved into b_enc",
                               "decoder rows unit-normed as load_dictionary does (codes scaled by the norms)"]


def _autoencoder_new(t: dict, trainer: dict, file: Path):
    _linear(t, file, "AutoEncoderNew", "decoder.bias")
    return "relu", {}, {"W_enc": t["encoder.weight"], "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].T.contiguous(),
                        "b_dec": t["decoder.bias"]}, []


def _topk(t: dict, trainer: dict, file: Path):
    _linear(t, file, "AutoEncoderTopK", "b_dec")
    return "topk", {"k": _k(t, trainer, file)}, {"W_enc": t["encoder.weight"], "b_enc": t["encoder.bias"],
                                                 "W_dec": t["decoder.weight"].T.contiguous(), "b_dec": t["b_dec"]}, \
        ["encode without the tracked threshold (load_dictionary's default for AutoEncoderTopK)"]


def _threshold(t: dict, file: Path) -> tuple[torch.Tensor, list[str]]:
    if "threshold" not in t or t["threshold"].numel() != 1:
        raise FeaturekitError(f"{file}: no scalar threshold; not a dictionary_learning BatchTopK state dict")
    theta = t["threshold"].reshape(())
    return theta.clamp_min(0), (["threshold < 0 (never tracked): ReLU alone, θ = 0"] if float(theta) < 0 else [])


def _batchtopk(t: dict, trainer: dict, file: Path):
    _linear(t, file, "BatchTopKSAE", "b_dec")
    theta, notes = _threshold(t, file)
    state = {"W_enc": t["encoder.weight"], "b_enc": t["encoder.bias"], "W_dec": t["decoder.weight"].T.contiguous(),
             "b_dec": t["b_dec"], "theta": theta, "theta_updates": torch.ones((), dtype=torch.long)}
    return "batchtopk", {"k": _k(t, trainer, file), "threshold_decay": float(trainer.get("threshold_beta", 0.999))}, state, notes


def _matryoshka(t: dict, trainer: dict, file: Path):
    d, n = tuple(t["W_enc"].shape) if "W_enc" in t and t["W_enc"].ndim == 2 else (0, 0)
    need(t, {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,)}, file, "MatryoshkaBatchTopKSAE")
    sizes = [int(s) for s in t["group_sizes"].tolist()] if "group_sizes" in t else trainer.get("group_sizes") or [n]
    prefixes = [int(p) for p in torch.tensor(sizes).cumsum(0).tolist()]
    theta, notes = _threshold(t, file)
    state = {"W_enc": t["W_enc"].T.contiguous(), "b_enc": t["b_enc"], "W_dec": t["W_dec"], "b_dec": t["b_dec"], "theta": theta,
             "theta_updates": torch.ones((), dtype=torch.long)}
    hyper = {"k": _k(t, trainer, file), "prefixes": prefixes, "threshold_decay": float(trainer.get("threshold_beta", 0.999))}
    return "matryoshka", hyper, state, notes


def _jumprelu(t: dict, trainer: dict, file: Path):
    d, n = tuple(t["W_enc"].shape) if "W_enc" in t and t["W_enc"].ndim == 2 else (0, 0)
    need(t, {"W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,), "threshold": (n,)}, file, "JumpReluAutoEncoder")
    W_enc = t["W_enc"].T.contiguous()
    notes = ["encoder uncentred (apply_b_dec_to_input=False): b_enc + W_enc^T b_dec"]
    if bool((t["threshold"] < 0).any()):
        notes.append("negative thresholds replaced by 0 (same codes: the library applies ReLU after the jump)")
    return "jumprelu", {}, {"W_enc": W_enc, "b_enc": centred_bias(W_enc, t["b_enc"], t["b_dec"]), "W_dec": t["W_dec"],
                            "b_dec": t["b_dec"], "theta": t["threshold"].clamp_min(0)}, notes


_READERS = {"AutoEncoder": _autoencoder, "AutoEncoderNew": _autoencoder_new, "AutoEncoderTopK": _topk,
            "BatchTopKSAE": _batchtopk, "MatryoshkaBatchTopKSAE": _matryoshka, "JumpReluAutoEncoder": _jumprelu}
