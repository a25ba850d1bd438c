"""The aggregate: per scorer, the mean of each metric over units with a seeded bootstrap 95 % interval, coverage
(units skipped for too few examples, explanations that could not be parsed, judge answers that could not be
parsed), and the rows the feature store's explanations table receives.

Main score of an explanation (the store's `score` column): detection balanced accuracy, else fuzzing balanced
accuracy, else embedding AUC, else surprisal AUC — the first the run computed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from .metrics import summarise

METRICS = {"detection": ("balanced_accuracy", "f1", "auc", "precision", "recall"),
           "fuzzing": ("balanced_accuracy", "f1", "auc", "precision", "recall"),
           "surprisal": ("auc", "drop_gap", "drop_activating", "drop_non_activating"),
           "embedding": ("auc", "similarity_activating", "similarity_non_activating"),
           "intruder": ("accuracy", "chance")}
MAIN = (("detection", "balanced_accuracy"), ("fuzzing", "balanced_accuracy"), ("embedding", "auc"), ("surprisal", "auc"))


def scorer_summary(scorer: str, per_unit: dict[int, dict], seed: int) -> dict:
    units = sorted(per_unit)
    out: dict[str, Any] = {"units": len(units), "answers": sum(per_unit[u].get("answers", 0) for u in units),
                           "unparsed_answers": sum(per_unit[u].get("unparsed", 0) for u in units)}
    for metric in METRICS[scorer]:
        out[metric] = summarise([per_unit[u]["metrics"].get(metric) for u in units], seed=seed)
    return out


def main_score(scores: dict[str, dict]) -> tuple[str, float] | None:
    for scorer, metric in MAIN:
        value = (scores.get(scorer) or {}).get(metric)
        if value is not None:
            return f"{scorer}.{metric}", value
    return None


def summarise_run(kind: str, chosen: list[int], records: dict[int, dict], results: dict, settings: Any, judge: dict,
                  label: str) -> dict:
    """summary.json (module docstring). Deterministic: only results, no timings."""
    seed = settings.seed
    skipped = [{"unit": u, "reason": records[u]["skipped"]} for u in chosen if records[u]["skipped"]]
    summary: dict[str, Any] = {
        "units": kind, "ids": list(chosen), "requested": len(chosen), "with_examples": len(chosen) - len(skipped), "skipped": skipped,
        "judge": {"label": label, **judge}, "settings": dataclasses.asdict(settings), "explainers": {}}
    for explainer in settings.explainers:
        expl = results["explanations"][explainer]
        entry: dict[str, Any] = {
            "explained": sum(1 for e in expl.values() if e["explanation"]),
            "unparseable": sorted(u for u, e in expl.items() if not e["explanation"]),
            "bare_answers": sum(1 for e in expl.values() if e["how"] == "bare"), "scores": {}, "shuffled": {}}
        per_unit: dict[int, dict] = {u: {"explanation": e["explanation"]} for u, e in sorted(expl.items())}
        for (name, scorer), res in results["scores"].items():
            base, _, suffix = name.partition("~")
            if base != explainer:
                continue
            entry["shuffled" if suffix else "scores"][scorer] = scorer_summary(scorer, res, seed)
            if not suffix:
                for u, r in res.items():
                    per_unit[u][scorer] = {m: r["metrics"].get(m) for m in METRICS[scorer][:3]}
        if not settings.shuffled:
            del entry["shuffled"]
        entry["per_unit"] = {str(u): v for u, v in per_unit.items()}
        summary["explainers"][explainer] = entry
    if "intruder" in results:
        summary["intruder"] = scorer_summary("intruder", results["intruder"], seed)
        summary["intruder"]["per_unit"] = {str(u): r["metrics"] for u, r in sorted(results["intruder"].items())}
    return summary


def store_rows(results: dict, summary: dict, label: str) -> list[tuple]:
    """(feature, explainer column, text, main score, details) for the store's explanations table."""
    rows = []
    intruder = results.get("intruder") or {}
    for explainer in summary["explainers"]:
        for u, e in sorted(results["explanations"][explainer].items()):
            if not e["explanation"]:
                continue
            scores = {scorer: res[u]["metrics"] for (name, scorer), res in results["scores"].items()
                      if name == explainer and u in res}
            main = main_score({k: {m: v.get(m) for m in METRICS[k]} for k, v in scores.items()})
            details = {"explainer": explainer, "judge": label, "how": e["how"], "main": main[0] if main else None,
                       "scores": {k: {m: v.get(m) for m in METRICS[k]} for k, v in scores.items()}}
            if u in intruder:
                details["intruder"] = intruder[u]["metrics"]
            rows.append((u, f"{explainer}@{label}", e["explanation"], main[1] if main else None, details))
    return rows


def write_store(path: Path, results: dict, summary: dict, label: str) -> int:
    from ..features.store import write_explanations

    rows = store_rows(results, summary, label)
    write_explanations(path, rows)
    return len(rows)
