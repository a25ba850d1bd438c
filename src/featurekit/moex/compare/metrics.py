"""Step 5 of the comparison: each model's validation loss, legal-move rate, BSP coverage and board reconstruction."""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import torch

from ..._io import atomic_write_json, read_json
from ...models.moexlm.folder import load_lm
from ...models.moexlm.lm import MoexLM
from ..chess import board_reconstruction, bsp_coverage, bsp_table, greedy_sampler, legal_move_rate, move_prefixes
from ..train import TrainSettings, evaluate_loss, split_stream
from .settings import N_CHARS, CompareSettings, say
from .units import spliced, unit_acts


class ChessLogits(torch.nn.Module):
    """The LM's logits over the 32 chess characters (drops <pad>), for greedy_sampler."""

    def __init__(self, model: MoexLM):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(ids).logits[..., :N_CHARS]



def legal_prefix_set(games: list[str], count: int, seed: int) -> list[str]:
    prefixes = [p for g in games for p in move_prefixes(g)]
    rng = random.Random(f"featurekit.moex.compare:{seed}")
    return rng.sample(prefixes, min(count, len(prefixes)))


def evaluate(name: str, model: MoexLM, s: CompareSettings, eval_games: list[str], val_part: torch.Tensor,
             sae: Any = None) -> dict[str, Any]:
    layer = s.layer_index
    undo = spliced(model, layer, sae) if sae is not None else None
    try:
        val_loss = evaluate_loss(model, val_part, 8, s.batch_size, s.seed)
        legal = legal_move_rate(legal_prefix_set(eval_games, s.legal_prefixes, s.seed),
                                sample=greedy_sampler(ChessLogits(model).eval(), context=s.seq_len))
    finally:
        if undo is not None:
            undo()
    with torch.no_grad():
        acts = unit_acts(model, eval_games, layer, sae.encode if sae is not None else None)
    half = len(eval_games) // 2
    cut = {"max_chars": s.max_chars, "max_positions": 20}
    table_a = bsp_table(eval_games[:half], ["board"], **cut)
    table_b = bsp_table(eval_games[half:], ["board"], **cut)
    a, b = table_a.gather(acts[:half]), table_b.gather(acts[half:])
    cover = bsp_coverage(torch.cat([a, b]), torch.cat([table_a.values, table_b.values]))
    recon = board_reconstruction(a, table_a.values, b, table_b.values)
    moved = table_a.columns("board", drop_start=True)  # without the starting position's (piece, square) pairs
    recon_moved = board_reconstruction(a, table_a.values[:, moved], b, table_b.values[:, moved])
    l0 = float((torch.cat([a, b]) > 0).sum(1).float().mean())
    return {"name": name, "val_loss": round(val_loss, 4), "legal_move_rate": round(legal.rate, 4), "legal": legal.legal,
            "legal_total": legal.total, "coverage": round(cover.mean, 4), "coverage_present": round(cover.mean_present, 4),
            "coverage_threshold": cover.threshold, "reconstruction": round(recon.score, 4),
            "reconstruction_micro_f1": round(recon.micro_f1, 4), "reconstruction_threshold": recon.threshold,
            "reconstruction_no_start": round(recon_moved.score, 4),
            "units": int(a.shape[1]), "l0": round(l0, 2), "positions": int(a.shape[0] + b.shape[0])}


def evaluate_all(out: Path, s: CompareSettings, stream: torch.Tensor, eval_games: list[str], progress: bool,
                 only: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    _, val_part = split_stream(stream, N_CHARS + 1, s.seq_len, TrainSettings().val_fraction)
    results = {}
    for name in only:
        path = out / "runs" / name / "eval.json"
        if path.exists():
            results[name] = read_json(path)
            continue
        began = time.time()
        if name == "sae":
            from ...dictionaries import fileformat
            res = evaluate(name, load_lm(out / "runs" / "dense_gelu"), s, eval_games, val_part,
                           sae=fileformat.load(out / "runs" / "sae" / "sae").eval())
        else:
            res = evaluate(name, load_lm(out / "runs" / name), s, eval_games, val_part)
        res["eval_s"] = round(time.time() - began, 1)
        atomic_write_json(path, res)
        results[name] = res
        say(f"{name}: coverage {res['coverage']:.3f}, reconstruction {res['reconstruction']:.3f}, legal "
             f"{res['legal_move_rate']:.3f}, L0 {res['l0']:.1f} ({res['eval_s']} s)", progress)
    return results

