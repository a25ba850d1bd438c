"""The settings of an autointerp run, and `--set key=value` overrides (`examples.*`, `scoring.*` or top-level keys)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import FeaturekitError
from . import explainers, scorers
from .examples import ExampleSettings


@dataclass
class Settings:
    examples: ExampleSettings = field(default_factory=ExampleSettings)
    scoring: scorers.ScoreSettings = field(default_factory=scorers.ScoreSettings)
    explainers: tuple[str, ...] = ("highlight",)
    scorers: tuple[str, ...] = scorers.SCORERS
    explain_tokens: int = 160  #: the longest explanation answer, in tokens
    pool_contexts: int = 512  #: contexts of the store's token stream in the pool
    density: float | None = None  #: controls fire on this fraction of tokens (None: the features' median density)
    seed: int = 0
    shuffled: bool = False

    def check(self) -> None:
        bad = [e for e in self.explainers if e not in explainers.EXPLAINERS] + [s for s in self.scorers if s not in scorers.SCORERS]
        if bad:
            raise FeaturekitError(f"unknown explainer or scorer {', '.join(bad)}: explainers {', '.join(explainers.EXPLAINERS)}; "
                                  f"scorers {', '.join(scorers.SCORERS)}")


def _convert(value: str, current: Any, key: str) -> Any:
    text = value.strip()
    if text.lower() in ("none", "null"):
        return None
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float) or current is None:
            return float(text)
        if isinstance(current, tuple):
            return tuple(p.strip() for p in text.split(",") if p.strip())
    except ValueError:
        raise FeaturekitError(f"--set {key}={value}: not a valid {type(current).__name__}") from None
    return text


def apply_overrides(settings: Settings, overrides: list[str]) -> Settings:
    """A copy of `settings` with each KEY=VALUE applied: examples.n_explain=10, scoring.n_shown=5, pool_contexts=256 …"""
    settings = dataclasses.replace(settings, examples=dataclasses.replace(settings.examples),
                                   scoring=dataclasses.replace(settings.scoring))
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        group, _, name = key.rpartition(".")
        target = {"": settings, "examples": settings.examples, "scoring": settings.scoring}.get(group)
        names = [f.name for f in dataclasses.fields(target)] if target is not None else []
        if not sep or target is None or name not in names or (target is settings and name in ("examples", "scoring")):
            known = ([f"examples.{f.name}" for f in dataclasses.fields(ExampleSettings)]
                     + [f"scoring.{f.name}" for f in dataclasses.fields(scorers.ScoreSettings)]
                     + [f.name for f in dataclasses.fields(Settings) if f.name not in ("examples", "scoring")])
            raise FeaturekitError(f"--set {item!r}: use KEY=VALUE with KEY one of {', '.join(known)}")
        setattr(target, name, _convert(value, getattr(target, name), key))
    settings.check()
    return settings
