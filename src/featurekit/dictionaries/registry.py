"""The method registry: every dictionary method, its hyper-parameters and their meaning, in one place.

A method registers itself where it is defined:

    @dataclass
    class ReLUParams:
        l1_coefficient: float = 5.0  #: λ of the decoder-norm-weighted L1 penalty

    @register(ReLUParams)
    class ReLUSAE(Dictionary):
        method = "relu"
        ...

`METHODS` maps the name to the class; `cls.Params` is the dataclass of the keys a config may set under
`dictionary.` beside `method` and `n_latents` (their `#:` comments are what `featurekit config` prints).
The file format (`fileformat.build`/`load`), the config loader, the CLI's method list and the docs read
it; nothing else lists the methods. A Params class may define `check(self, n_latents)` to refuse bad
values before any work (`HyperParams`). `legacy` maps names of format v1 — configs and dictionary files
written before the registry, when every method's keys shared one flat section — onto the new names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

from ..errors import FeaturekitError

METHODS: dict[str, type] = {}


@runtime_checkable
class HyperParams(Protocol):
    """What a method's Params dataclass may add to its fields: a check of its values (a FeaturekitError
    naming the `dictionary.` key and the fix), run by the config's validation before any work."""

    def check(self, n_latents: int) -> None: ...


def register(params: type, *, legacy: dict[str, str] | None = None):
    """Class decorator: record `cls` under `cls.method` with its hyper-parameter dataclass `params`."""
    if not dataclasses.is_dataclass(params):
        raise TypeError(f"register() takes the method's hyper-parameter dataclass, got {params!r}")

    def record(cls: type) -> type:
        if not cls.method:
            raise TypeError(f"{cls.__name__} must set `method` before it is registered")
        if cls.method in METHODS and METHODS[cls.method] is not cls:
            raise TypeError(f"method name {cls.method!r} is registered twice ({METHODS[cls.method].__name__}, {cls.__name__})")
        cls.Params = params
        cls.legacy_names = dict(legacy or {})
        METHODS[cls.method] = cls
        return cls

    return record


def method_class(name: str) -> type:
    """The registered class of method `name`, or a FeaturekitError listing the methods."""
    if name not in METHODS:
        raise FeaturekitError(f"unknown dictionary method {name!r}; choose one of {sorted(METHODS)} (`featurekit config --methods`)")
    return METHODS[name]


def param_names(name: str) -> list[str]:
    """The `dictionary.` keys method `name` takes besides method and n_latents, in declaration order."""
    return [f.name for f in dataclasses.fields(method_class(name).Params)]


def check_params(params: Any, n_latents: int) -> None:
    """Run the Params class's own `check` (HyperParams), if it has one."""
    if isinstance(params, HyperParams):
        params.check(n_latents)


def check_k(k: int, n_latents: int) -> None:
    """The check every method with a `k` shares: 1 ≤ k ≤ n_latents."""
    if not 0 < k <= n_latents:
        raise FeaturekitError(f"dictionary.k={k} must lie in [1, dictionary.n_latents={n_latents}]")


def check_decay(decay: float) -> None:
    """An exponential moving average's factor lies in [0, 1)."""
    if not 0 <= decay < 1:
        raise FeaturekitError(f"dictionary.threshold_decay must lie in [0, 1), got {decay}")
