"""Step 6 of the comparison: one row per model beside the paper's numbers, as results.json and results.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..._io import read_json
from .settings import ENTRIES

# Yang et al. 2025 (MoE-X), chess, equal activated parameters: BSP coverage, board reconstruction, validation loss.
# Table 1 (dense GELU = GPT-2, ReLU, Switch, MoE-X) and Table 4 (training: MoE-X from scratch vs upcycled; its
# upcycled row equals Table 1's MoE-X row). Transcribed in shared/research/seed-methods-other.md §4.5.
PAPER = {"dense_gelu": {"coverage": 0.356, "reconstruction": 0.608, "val_loss": 0.213, "source": "Table 1 (GELU)"},
         "dense_relu": {"coverage": 0.312, "reconstruction": 0.581, "val_loss": 0.215, "source": "Table 1 (ReLU)"},
         "switch": {"coverage": 0.424, "reconstruction": 0.734, "val_loss": 0.212, "source": "Table 1 (Switch)"},
         "moex": {"coverage": 0.398, "reconstruction": 0.657, "val_loss": None, "source": "Table 4 (from scratch)"},
         "moex_upcycled": {"coverage": 0.428, "reconstruction": 0.840, "val_loss": 0.211,
                           "source": "Table 1 (MoE-X) = Table 4 (upcycled)"},
         "sae": None}


def result_rows(out: Path, results: dict[str, dict[str, Any]], sae_info: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per entry: its eval.json, its training (run folder's summary.json and wall.json, or the SAE's info)
    and the paper's numbers."""
    rows = []
    for name in ENTRIES:
        run = out / "runs" / name
        row = dict(results[name])
        if name == "sae":
            row.update(train_steps=sae_info["steps"], train_wall_s=sae_info["wall_s"], sae_k=sae_info["k"],
                       sae_latents=sae_info["n_latents"], sae_fvu_train=sae_info["fvu_train"])
        else:
            summary = read_json(run / "summary.json")
            wall = read_json(run / "wall.json")["seconds"] if (run / "wall.json").exists() else None
            row.update(train_steps=summary["steps"], train_tokens=summary["tokens"], train_wall_s=wall,
                       train_loss=round(summary["train_loss"], 4), activated_params=summary["params"]["activated"],
                       activated_mlp_params=summary["params"]["activated_mlp"], total_params=summary["params"]["total"])
        row["paper"] = PAPER[name]
        rows.append(row)
    return rows


def _f(v: Any, nd: int = 3) -> str:
    return "—" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    lines = ["# MoE-X comparison on chess (featurekit moex compare)", "",
             f"d_model {s['d_model']}, {s['n_layer']} layers, seq_len {s['seq_len']}, {s['n_experts']} experts top-{s['top_k']}; "
             f"{doc['steps']} steps × {s['batch_size']} × {s['seq_len']} = {doc['tokens_per_model']:,} tokens per model; "
             f"{s['games']} training games ({doc['train_chars']:,} characters), {doc['eval_games']} evaluation games; "
             f"units of `{doc['site']}`; {doc['threads']} thread(s).", "",
             "| model | val loss | legal moves | coverage | reconstruction | rec. w/o start squares | units | L0 | train s | "
             "paper cov. / rec. (source) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["models"]:
        paper = r["paper"]
        ref = f"{paper['coverage']:.3f} / {paper['reconstruction']:.3f} ({paper['source']})" if paper else "— (Fig. 3 only)"
        name = r["name"] + (f" (TopK k={r['sae_k']}, spliced)" if r["name"] == "sae" else "")
        lines.append(f"| {name} | {_f(r['val_loss'])} | {_f(r['legal_move_rate'])} ({r['legal']}/{r['legal_total']}) | "
                     f"{_f(r['coverage'])} | {_f(r['reconstruction'])} | {_f(r['reconstruction_no_start'])} | {r['units']} | "
                     f"{_f(r['l0'], 1)} | "
                     f"{_f(r.get('train_wall_s'), 0)} | {ref} |")
    lines += ["", "Coverage and reconstruction: Karvonen et al.'s metrics on the `board` properties (piece on square) at the "
              "`.` positions; reconstruction labels from the first half of the evaluation games, scored on the second; "
              "'w/o start squares' leaves out the 32 (piece, square) pairs of the starting position, as one version of "
              "their code does. L0: mean nonzero units per evaluated position. Paper: Yang et al. 2025, chess, equal activated "
              "parameters (val loss there is on real games).", ""]
    return "\n".join(lines)
