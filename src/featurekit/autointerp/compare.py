"""The measurement with its controls: the run's features against the model's own MLP neurons at the site's layer,
random unit directions at the site and shuffled explanations, all with the same judge, settings, contexts and
seed, each scorer's mean with its bootstrap 95 % interval side by side.

    measure(run_dir, n_units=200, judge="http://127.0.0.1:8000/v1")   (CLI: featurekit explain RUN_DIR --controls)

Each arm is an ordinary `explain_run` in RUN_DIR/autointerp/UNITS/ (resumable; the replay cache
RUN_DIR/autointerp/cache is shared), and the table goes to RUN_DIR/autointerp/comparison.{json,md}.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .._io import atomic_write_json, atomic_write_text
from .run import explain_run
from .settings import Settings

MAIN = {"detection": "balanced_accuracy", "fuzzing": "balanced_accuracy", "surprisal": "auc", "embedding": "auc",
        "intruder": "accuracy"}


def measure(run_dir: str | Path, *, n_units: int = 200, layer: int | None = None, judge: Any = None,
            settings: Settings | None = None, surprisal_model: str | None = None, progress: bool = True,
            overwrite: bool = False, device: str = "cpu") -> dict:
    """Run the four arms (module docstring) and write the comparison; returns it."""
    from ..models.sites import parse_site
    from ..pipeline import load_run_config

    run_dir = Path(run_dir)
    layer = parse_site(load_run_config(run_dir).site).layer if layer is None else int(layer)
    s = dataclasses.replace(settings or Settings(), shuffled=True)
    cache = run_dir / "autointerp" / "cache"
    arms = {}
    for units in ("features", f"mlp_hidden.{layer}", "random"):
        arms[units] = explain_run(run_dir, units=units, n_units=n_units, judge=judge, settings=s, cache=cache,
                                  surprisal_model=surprisal_model, progress=progress, overwrite=overwrite, device=device,
                                  write_to_store=units == "features")
    table = comparison(arms)
    atomic_write_json(run_dir / "autointerp" / "comparison.json", table)
    atomic_write_text(run_dir / "autointerp" / "comparison.md", markdown(table))
    return table


def comparison(arms: dict[str, dict]) -> dict:
    """{rows: [{arm, explainer, units, <scorer>: {mean, ci95, n}}], metrics: scorer → metric}: one row per arm and
    explainer, and one more per explainer for its shuffled explanations."""
    rows = []
    for arm, summary in arms.items():
        for explainer, entry in summary["explainers"].items():
            for group, label in (("scores", arm), ("shuffled", f"{arm}, shuffled explanations")):
                if group not in entry:
                    continue
                row: dict[str, Any] = {"arm": label, "explainer": explainer, "units": summary["with_examples"],
                                       "explained": entry["explained"]}
                for scorer, metric in MAIN.items():
                    if scorer in entry[group]:
                        row[scorer] = entry[group][scorer][metric]
                if group == "scores" and "intruder" in summary:
                    row["intruder"] = summary["intruder"]["accuracy"]
                rows.append(row)
    return {"metrics": MAIN, "rows": rows}


def _cell(m: dict | None) -> str:
    if not m or m.get("mean") is None:
        return "–"
    ci = f" [{m['ci95'][0]:.2f}, {m['ci95'][1]:.2f}]" if m.get("ci95") else ""
    return f"{m['mean']:.3f}{ci} (n={m['n']})" if m.get("n") is not None else f"{m['mean']:.3f}{ci}"


def markdown(table: dict) -> str:
    scorers = [s for s in MAIN if any(s in r for r in table["rows"])]
    head = ["arm", "explainer", "units", "explained"] + [f"{s} ({MAIN[s]})" for s in scorers]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table["rows"]:
        lines.append("| " + " | ".join([r["arm"], r["explainer"], str(r["units"]), str(r.get("explained", "–"))]
                                       + [_cell(r.get(s)) for s in scorers]) + " |")
    return ("\n".join(lines) + "\n\nMeans over units with a seeded bootstrap 95 % interval (n: the units with a value; only units "
            "with a parsed explanation are scored); intruder accuracy is explanation-free.\n")
