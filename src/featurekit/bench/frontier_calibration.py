"""The sparsity settings of the frontier's points: the fixed sweeps of the k-methods, and the calibration search
that finds the knob of a method whose L0 follows a penalty, a target frequency or an initialisation (`CALIBRATED`)
for each target L0 (`next_trial`: a secant search in log-log space, every trial a full training and a point of
the frontier, up to `Knob.max_trials` per method), driven by `frontier.run_frontier`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..dictionaries.gba import GBAParams

#: methods swept over a fixed list instead of `ks`: MP-SAE runs k full pursuit steps per token (k encoder-sized
#: matmuls), so its k stops at 32 on CPU; SNMF has no sparsity knob on its codes (nonnegative least squares: L0
#: is what the fit gives), so its points sweep the share of neurons (input dimensions) kept per feature.
FIXED_SWEEPS: dict[str, tuple[str, list[Any]]] = {"mpsae": ("k", [8, 16, 32]), "snmf": ("sparsity", [0.01, 0.05, 0.2])}


@dataclass(frozen=True)
class Knob:
    """A hyper-parameter that sets a method's L0 only indirectly (a penalty, a target frequency, an init):
    `frontier.run_frontier` searches it for each target L0, one full training per trial (`next_trial`)."""

    name: str
    start: float | None  #: first trial; None: the middle target L0 / latents (a firing rate)
    rises: bool  #: whether L0 rises with the knob (the direction of the second trial only)
    high: float = math.inf  #: trials stay below this (a rate < 1)
    max_trials: int = 7
    low: float = 0.0  #: trials stay above this (GBA: its last group's target frequency, freq_low)


#: methods whose sparsity is set by a calibrated knob (module docstring). JumpReLU's λ (`l0_coefficient`) moves
#: θ by about lr per step under Adam whatever its size, so in a run of ~100 steps L0 stays where the
#: initialisation put it (L0 ≈ 182 for λ = 1, 3 and 10 alike); what sets its L0 at this budget is the initial
#: firing rate of b_enc (`init_firing_rate`), which is searched instead, λ at its default.
CALIBRATED: dict[str, Knob] = {
    "relu": Knob("l1_coefficient", 5.0, rises=False),
    "jumprelu": Knob("init_firing_rate", None, rises=True, high=0.5),
    "gba": Knob("freq_high", 0.05, rises=True, high=0.5, low=GBAParams.freq_low),  # the frontier keeps freq_low's default
    "topafa": Knob("afa_coefficient", 1 / 64, rises=False),
}


def sweep(method: str, ks: list[int]) -> tuple[str, list[Any]]:
    """(config field, values) of a method swept over fixed values (not `CALIBRATED`)."""
    return FIXED_SWEEPS.get(method, ("k", list(ks)))


def next_trial(knob: Knob, measured: list[tuple[float, float]], targets: list[int], tol: float,
               latents: int) -> tuple[int, float] | None:
    """(target L0, knob value) of the next calibration trial, or None when every target has a measured point
    within `tol` (relative), or the knob cannot get closer (its L0 does not move, the value was tried already).

    The middle target first, then the others in order. The value is a secant step in log-log space from the
    measured point nearest the target, along the slope of the two points that bracket the target (or the two
    nearest it); with one point measured, the second trial steps with slope ±1 in the knob's direction.
    Steps are capped at a factor 16."""
    order = sorted(targets, key=lambda t: (t != sorted(targets)[len(targets) // 2], t))
    if not measured:
        start = knob.start if knob.start is not None else order[0] / latents
        return order[0], start
    good = [(v, l0) for v, l0 in measured if l0 > 0 and v > 0]

    def off(l0: float, t: float) -> float:
        return abs(math.log(l0 / t))

    missing = [t for t in order if not any(off(l0, t) <= math.log1p(tol) for _, l0 in good)]
    if not missing or not good:
        return None
    target = missing[0]
    near = sorted(good, key=lambda p: off(p[1], target))
    below = [p for p in near if p[1] < target]
    above = [p for p in near if p[1] > target]
    pair = [below[0], above[0]] if below and above else near[:2]
    if len(pair) == 2 and pair[0][0] != pair[1][0]:
        slope = (math.log(pair[1][1]) - math.log(pair[0][1])) / (math.log(pair[1][0]) - math.log(pair[0][0]))
    else:
        slope = 1.0 if knob.rises else -1.0
    if abs(slope) < 0.05:
        return None  # the knob hardly moves L0 here
    v0, l00 = near[0]
    step = min(max(math.log(target / l00) / slope, -math.log(16)), math.log(16))
    value = float(f"{max(min(v0 * math.exp(step), knob.high * 0.999), knob.low * 1.001):.3g}")
    if any(abs(math.log(value / v)) < 0.01 for v, _ in good):
        return None
    return target, value
