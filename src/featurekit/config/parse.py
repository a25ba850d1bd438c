"""Building a RunConfig from plain data: defaults, then a config file, then `key=value` overrides; every
key checked against its section (with "did you mean" for near misses) and every value against its type.

The dictionary section is special: beside `method` and `n_latents` it holds the keys of the method's own
Params (the registry), so which keys are valid depends on the method. Configs written before the
registry (format v1: every method's keys in one flat section, some prefixed, e.g. `gba_groups`) still
load: their keys are renamed (`legacy`) and, in a full v1 dump, the keys of other methods dropped.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from pathlib import Path
from typing import Any

from ..dictionaries.registry import METHODS, method_class
from ..errors import FeaturekitError
from .files import parse_yaml, read_config_file
from .schema import DictionaryConfig, RunConfig

#: the flat dictionary section of format v1 (before the registry): a config.json holding all of these is a v1 dump
V1_DICTIONARY_KEYS = frozenset((
    "k", "selection", "threshold_decay", "prefixes", "l1_coefficient", "l0_coefficient", "bandwidth", "threshold_init",
    "init_firing_rate", "beta", "afa_coefficient", "kl_coefficient", "learned_variance", "residual_threshold", "revive_coef",
    "itda_threshold", "snmf_sparsity", "snmf_nnls_iters", "snmf_decay", "snmf_passes", "gba_groups", "gba_freq_high",
    "gba_freq_low", "gba_rate_down", "gba_rate_up", "gba_every", "gba_eps", "gba_bias_min", "gba_activation", "gba_two_sided"))


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a dict, rejecting unknown keys with the list of valid ones."""
    if not isinstance(data, dict):
        what = f"config key {where.rstrip('.')}" if where else "a config"
        raise FeaturekitError(f"{what} must be a mapping of keys to values (a JSON object), got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, data)) - names)
    if unknown:
        named = [f"{where}{k} (did you mean {where}{close}?)" if (close := did_you_mean(k, names)) else where + k for k in unknown]
        raise FeaturekitError(f"unknown config key(s) {', '.join(named)}; valid: {sorted(where + n for n in names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise FeaturekitError(f"config key {where + key} must be a mapping, got {value!r}")
            kwargs[key] = dictionary_from_dict(value, f"{where}{key}.") if hint is DictionaryConfig else \
                from_dict(hint, value, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, where + key)
    return cls(**kwargs)


def dictionary_from_dict(data: dict[str, Any], where: str = "dictionary.") -> DictionaryConfig:
    """The dictionary section: `method` and `n_latents`, then the method's Params from the other keys
    (renamed from format v1 where needed; a full v1 dump's keys of other methods are dropped)."""
    method = data.get("method", DictionaryConfig.method)
    if method not in METHODS:
        close = did_you_mean(str(method), METHODS)
        raise FeaturekitError(f"config key {where}method must be one of {sorted(METHODS)}, got {method!r}"
                              + (f" (did you mean {close}?)" if close else ""))
    cls = method_class(method)
    rest = {k: v for k, v in data.items() if k not in ("method", "n_latents")}
    names = {f.name for f in dataclasses.fields(cls.Params)}
    v1_dump = V1_DICTIONARY_KEYS <= set(rest)
    renamed = {}
    for key, value in rest.items():
        new = cls.legacy_names.get(key, key)
        if v1_dump and new not in names:
            continue  # a v1 config.json lists every method's keys; this one belongs to another method
        renamed[new] = value
    unknown = sorted(set(map(str, renamed)) - names)
    if unknown:
        valid = names | {"method", "n_latents"}
        hints = [f"{where}{k}" + (f" (did you mean {where}{c}?)" if (c := did_you_mean(k, valid)) else "") for k in unknown]
        raise FeaturekitError(f"unknown config key(s) {', '.join(hints)}; valid: {sorted(where + n for n in valid)} — the keys of "
                              f"dictionary.method={method} (`featurekit config` lists each method's own keys)")
    n_latents = _coerce(data.get("n_latents", DictionaryConfig.n_latents), int, f"{where}n_latents")
    return DictionaryConfig(method, n_latents, from_dict(cls.Params, renamed, where))


def did_you_mean(key: str, names: typing.Iterable[str]) -> str | None:
    """The valid name `key` most likely meant: same letters without underscores (nlatents → n_latents),
    its initials (learning_rate → lr), or a close spelling (difflib)."""
    names = sorted(names)
    squash = key.replace("_", "").lower()
    initials = "".join(word[:1] for word in key.lower().split("_") if word)
    for name in names:
        if name.replace("_", "").lower() == squash or ("_" in key and name == initials):
            return name
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
    return close[0] if close else None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Defaults, then the file (YAML or JSON) if given, then `key=value` overrides."""
    data: dict[str, Any] = read_config_file(path) if path is not None else {}
    for item in overrides or []:
        _apply_override(data, item)
    try:
        return from_dict(RunConfig, data)
    except FeaturekitError as err:
        if path is None or not _fails(read_config_file(path)):
            raise
        raise FeaturekitError(f"config file {path}: {err}") from err


def _apply_override(data: dict[str, Any], item: str) -> None:
    """Set one dotted `key=value` (the value read as YAML) inside `data`."""
    if "=" not in item:
        raise FeaturekitError(f"override {item!r} must look like key=value, e.g. train.lr=1e-3")
    key, raw = item.split("=", 1)
    node = data
    *parents, leaf = key.strip().split(".")
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            section = ".".join(parents[: i + 1])
            raise FeaturekitError(f"override {item!r}: config key {section} is a value, not a section with keys")
    node[leaf] = parse_yaml(raw, f"the value of override {item!r}")


def _fails(data: dict[str, Any]) -> bool:
    """True if `data` alone does not build a RunConfig (so an error comes from the file, not the overrides)."""
    try:
        from_dict(RunConfig, data)
    except FeaturekitError:
        return True
    return False


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check/convert a scalar against its annotation (int, float, str, bool, Optional[...])."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise FeaturekitError(f"config key {key} cannot be null")
    target = next((a for a in args if a is not type(None)), hint) if args else hint
    if typing.get_origin(target) is list:
        if isinstance(value, (list, tuple)):
            (item,) = typing.get_args(target)
            return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        raise FeaturekitError(f"config key {key} must be a list, e.g. {key}=[1,2], got {value!r}")
    if target is bool:
        if isinstance(value, bool):
            return value
    elif target is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif target is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif target is str:
        if not isinstance(value, (dict, list)):
            return str(value)
    raise FeaturekitError(f"config key {key} must be {getattr(target, '__name__', target)}, got {value!r}")


def non_finite(cfg: Any, where: str = "") -> list[tuple[str, float]]:
    """(key, value) of every NaN or infinite float in config dataclass `cfg`, nested sections and lists included."""
    found: list[tuple[str, float]] = []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), where + f.name
        if isinstance(cfg, DictionaryConfig) and f.name == "params":
            found += non_finite(value, where)  # the method's keys sit flat in the dictionary section
        elif dataclasses.is_dataclass(value):
            found += non_finite(value, key + ".")
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, float) and not math.isfinite(item):
                found.append((f"{key}[{i}]" if isinstance(value, list) else key, item))
    return found
