"""The MoE-X comparison on chess (issue 24, "What it must show"): five LMs and an SAE, one table.

``compare(out_dir, settings)`` does, each step resumable and skipped when already done (one module per step:
plan.py, models.py, metrics.py, table.py; settings.py holds the settings, units.py reads a layer's units):

1. **data** — ``data/train`` and ``data/eval``: random/greedy legal games (chess.build_dataset) under two seeds,
   so evaluation games are unseen.
2. **plan** — ``plan.json``: the settings and the step count. ``steps`` fixes it; ``minutes_per_model`` times a
   few MoE-X steps (the slowest kind) and picks the steps that take MoE-X about that long, once; a rerun reuses
   the plan and refuses other settings (use another OUT_DIR).
3. **models** — ``runs/<name>``, moex.train run folders, the same steps × batch × seq_len tokens each, at equal
   activated MLP parameters (lm.activated_mlp_params; top_k experts of width H/top_k): ``dense_gelu``,
   ``dense_relu``, ``switch``, ``moex`` (from scratch) and ``moex_upcycled`` (experts copied from the finished
   ``dense_relu`` run, then the same number of steps again: it has seen twice the tokens, counting its dense start).
4. **sae** — ``runs/sae``: a TopK SAE (dictionaries.TopKSAE, train.Trainer) on the dense GELU model's
   ``mlp_hidden.L`` (the input of ``blocks[L].mlp.down``), harvested with capture_activations on training
   windows. Latents: M·D, MoE-X's unit count; k: ``sae_k``, or (0) MoE-X's measured mean L0 at that layer
   (its nonzero gated units per evaluated position), so both have the same number of active units.
5. **metrics** — ``runs/<name>/eval.json`` for each: validation loss (the SAE's: the dense GELU model with the
   SAE's reconstruction spliced into that layer), legal-move rate of greedy continuations from held-out game
   prefixes (the SAE's: spliced), and, on the units of layer L (MLP hidden units; the SAE's latents) at the
   ``.`` positions of the evaluation games (Karvonen cut: first ``max_chars`` characters, 20 dots a game),
   BSP coverage and board reconstruction on the ``board`` group (piece on square): labels from the first half
   of the evaluation games, scored on the second half; coverage over all evaluation positions.
6. ``results.json`` and ``results.md``, written atomically, beside the paper's numbers.

The library uses the caller's torch thread count; `featurekit moex compare` sets one thread (``--threads``).
Guide: docs/moex.md.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..._io import atomic_write_json, atomic_write_text
from ..chess import token_stream
from .metrics import evaluate, evaluate_all
from .models import train_models, train_sae
from .plan import datasets, plan
from .settings import ENTRIES, MODELS, CompareSettings
from .table import markdown, result_rows

__all__ = ["ENTRIES", "MODELS", "CompareSettings", "compare", "evaluate", "markdown"]


def compare(out_dir: str | Path, settings: CompareSettings, progress: bool = True, device: str = "cpu") -> dict[str, Any]:
    """Run (or resume) the whole comparison in ``out_dir``; returns what results.json holds (module docstring).

    ``device`` is where the five LMs train (``"cuda"`` on a GPU); it is not part of the plan, so a run may resume on
    another device. The SAE and the metrics run on the CPU (they are small)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(settings.seed)
    train_games, eval_games = datasets(out, settings, progress)
    stream = token_stream(train_games)
    p = plan(out, settings, stream, progress)
    steps = p["steps"]
    train_models(out, settings, stream, steps, progress, device)
    results = evaluate_all(out, settings, stream, eval_games, progress, MODELS)
    k = settings.sae_k or max(1, round(results["moex"]["l0"]))
    sae_info = train_sae(out, settings, stream, k, progress)
    results.update(evaluate_all(out, settings, stream, eval_games, progress, ("sae",)))
    rows = result_rows(out, results, sae_info)
    doc = {"settings": asdict(settings), "steps": steps, "tokens_per_model": p["tokens_per_model"],
           "moex_seconds_per_step": p["moex_seconds_per_step"], "layer": settings.layer_index,
           "site": f"mlp_hidden.{settings.layer_index}", "threads": torch.get_num_threads(),
           "train_chars": int(stream.numel()), "eval_games": len(eval_games), "models": rows}
    atomic_write_json(out / "results.json", doc)
    atomic_write_text(out / "results.md", markdown(doc))
    return doc

