"""Steps 1–2 of the comparison: the games (train and held-out) and the plan (the step budget every model gets)."""

from __future__ import annotations

import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import torch

from ..._io import atomic_write_json, read_json
from ...errors import FeaturekitError
from ...models.moexlm.lm import MoexLM
from ..chess import build_dataset, read_games
from ..train import batch_at
from .settings import CompareSettings, say


def datasets(out: Path, s: CompareSettings, progress: bool) -> tuple[list[str], list[str]]:
    spec = s.games_spec()
    build_dataset(out / "data" / "train", seed=s.seed, count=s.games, spec=spec, progress=progress)
    build_dataset(out / "data" / "eval", seed=s.seed + 1, count=s.eval_games, spec=spec, progress=progress)
    return read_games(out / "data" / "train"), read_games(out / "data" / "eval")


def seconds_per_step(s: CompareSettings, stream: torch.Tensor, trials: int = 3) -> float:
    """Measured seconds of one MoE-X training step (forward, backward, AdamW) at these settings."""
    torch.manual_seed(s.seed)
    model = MoexLM(s.lm("moex"))
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr)
    times = []
    for step in range(trials + 1):  # the first is a warm-up
        began = time.perf_counter()
        x, y = batch_at(stream, step, s.batch_size, s.seq_len, s.seed)
        ce, aux = model.loss(x, y)
        opt.zero_grad()
        (ce + model.config.aux_weight * aux).backward()
        opt.step()
        times.append(time.perf_counter() - began)
    return sorted(times[1:])[len(times[1:]) // 2]


def plan(out: Path, s: CompareSettings, stream: torch.Tensor, progress: bool) -> dict[str, Any]:
    """The step count every model trains for, fixed once in plan.json: ``steps``, or from a timing probe of MoE-X
    (the slowest kind) for ``minutes_per_model``; later runs (a resume in another session) reuse it, so the token
    budget never depends on how loaded the CPU is then."""
    path = out / "plan.json"
    if path.exists():
        old = read_json(path)
        # a plan written before a setting existed had that setting's default
        recorded = {**{f.name: f.default for f in fields(CompareSettings)}, **old.get("settings", {})}
        if recorded != asdict(s):
            changed = sorted(k for k in asdict(s) if recorded.get(k) != asdict(s)[k])
            raise FeaturekitError(f"{out} holds a comparison with other settings ({', '.join(changed)} differ); rerun with "
                                  "the same settings to resume it, or give another OUT_DIR")
        return old
    if s.steps:
        steps, measured = s.steps, None
    else:
        measured = seconds_per_step(s, stream)
        steps = max(1, int(s.minutes_per_model * 60 / measured))
        say(f"MoE-X: {measured:.3f} s/step measured -> {steps} steps per model for ~{s.minutes_per_model} min", progress)
    doc = {"settings": asdict(s), "steps": steps, "moex_seconds_per_step": measured,
           "tokens_per_model": steps * s.batch_size * s.seq_len}
    atomic_write_json(path, doc)
    return doc

