"""Scorers: how well an explanation (or, for the intruder test, the examples alone) tells a unit's activating
excerpts from its non-activating ones. Each gives per-example rows and a unit's metrics (`metrics.py`).

Judge scorers (two steps: `requests(...)` → the judge → `finish(..., answers)`):

- `detection` (delphi): unmarked excerpts, activating (label 1) and non-activating (0), `n_shown` per
  question; the judge answers 1 if the feature as explained is active in the excerpt. Balanced accuracy, F1,
  and AUC from the judge's P(1) / (P(0) + P(1)) where it returns log-probabilities.
- `fuzzing` (delphi): marked excerpts; activating ones marked at their active tokens (1), non-activating ones
  marked at decoys (0): a neighbour negative at its neighbour's active tokens, any other at as many random
  tokens as an activating excerpt has marks on average. The judge answers 1 if the marks are the tokens the
  explanation describes. Same metrics.
- `intruder` (arXiv 2507.08473; explanation-free): `intruder_shown` − 1 activating excerpts of one activation
  band (bands in turn) and one non-activating excerpt with decoy marks, shuffled; the judge names the odd one.
  Accuracy against chance 1 / intruder_shown.

Local scorers (no judge):

- `surprisal` (delphi): a local causal LM reads each excerpt after "Description: <explanation>" and after a
  baseline description; an excerpt's score is how much the explanation lowers its mean token loss (nats).
  AUC of that drop, activating vs non-activating, and the mean drop of each.
- `embedding` (delphi): MiniLM cosine similarity between the explanation and each excerpt; AUC.

One-excerpt questions and intruder questions carry their valid answers (`Request.choices`): an in-process judge
picks the most probable one (`hf.py`), an HTTP judge answers freely. An answer that cannot be parsed leaves
its rows without a prediction: counted in `unparsed`, left out of the metrics, never dropped silently.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

from . import prompts
from .judges import Request
from .metrics import classification_metrics, mean, roc_auc
from .text import active_marks, marked, plain, random_marks

JUDGE_SCORERS = ("detection", "fuzzing", "intruder")
LOCAL_SCORERS = ("surprisal", "embedding")
SCORERS = JUDGE_SCORERS + LOCAL_SCORERS
BASELINE = "various unrelated text"


@dataclass
class ScoreSettings:
    n_shown: int = 1  #: excerpts per detection / fuzzing question (delphi: 1 keeps answers independent)
    intruder_shown: int = 5  #: excerpts per intruder question (one of them the intruder)
    n_intruder: int = 10  #: intruder questions per unit
    logprobs: int = 10  #: top log-probabilities asked per answer token (0: none; AUC needs them)


def samples(record: dict) -> list[dict]:
    """The labelled excerpts of a unit: its test set (label 1) and its negatives (label 0)."""
    return [{**w, "label": 1} for w in record["test"]] + [{**w, "label": 0} for w in record["negatives"]]


def _decoy_count(record: dict) -> int:
    counts = [len(active_marks(w["acts"])) for w in record["test"]]
    return max(1, math.ceil(sum(counts) / len(counts))) if counts else 1


def _decoy(w: dict, count: int, rng: random.Random) -> str:
    marks = w.get("marks") or random_marks(len(w["tokens"]), count, rng)
    return marked(w["tokens"], marks)


def _shown(scorer: str, w: dict, count: int, rng: random.Random) -> str:
    if scorer == "detection":
        return plain(w["tokens"])
    return marked(w["tokens"], active_marks(w["acts"])) if w["label"] else _decoy(w, count, rng)


def answer_tokens(n: int) -> int:
    return 8 if n == 1 else 4 * n + 8


def requests(scorer: str, record: dict, explanation: str | None, s: ScoreSettings, seed: int) -> tuple[list[Request], dict]:
    """The judge questions of a judge scorer for one unit, and what `finish` needs to read the answers."""
    rng = random.Random(f"{seed}:{scorer}:{record['unit']}")
    if scorer == "intruder":
        return _intruder_requests(record, s, rng)
    rows = samples(record)
    order = list(range(len(rows)))
    rng.shuffle(order)
    count = _decoy_count(record)
    texts = {i: _shown(scorer, rows[i], count, rng) for i in order}
    build = prompts.detection if scorer == "detection" else prompts.fuzzing
    batches = [order[k:k + s.n_shown] for k in range(0, len(order), s.n_shown)]
    reqs = [Request.of(build(explanation, [texts[i] for i in b]), answer_tokens(len(b)), logprobs=s.logprobs,
                       choices=("1", "0") if len(b) == 1 else ()) for b in batches]
    return reqs, {"batches": batches, "rows": rows}


def _intruder_requests(record: dict, s: ScoreSettings, rng: random.Random) -> tuple[list[Request], dict]:
    by_kind: dict[str, list[dict]] = {}
    for w in record["test"]:
        by_kind.setdefault(w["kind"], []).append(w)
    kinds = sorted(k for k, v in by_kind.items() if len(v) >= s.intruder_shown - 1) or ["all"]
    if kinds == ["all"]:
        by_kind = {"all": list(record["test"])}
    negatives = list(record["negatives"])
    rng.shuffle(negatives)
    count = _decoy_count(record)
    reqs, questions = [], []
    for q in range(min(s.n_intruder, len(negatives))):
        kind = kinds[q % len(kinds)]
        group = by_kind[kind]
        majority = rng.sample(group, min(s.intruder_shown - 1, len(group)))
        texts = [marked(w["tokens"], active_marks(w["acts"])) for w in majority]
        where = rng.randrange(len(texts) + 1)
        texts.insert(where, _decoy({**negatives[q], "label": 0}, count, rng))
        reqs.append(Request.of(prompts.intruder(texts), 8, choices=tuple(str(k) for k in range(1, len(texts) + 1))))
        questions.append({"kind": kind, "intruder": where + 1, "shown": len(texts), "negative": negatives[q]["kind"]})
    return reqs, {"questions": questions}


def finish(scorer: str, plan: dict, answers: list[dict]) -> dict:
    """A judge scorer's result for one unit from the judge's answers to `requests`."""
    if scorer == "intruder":
        rows, unparsed = [], 0
        for q, a in zip(plan["questions"], answers):
            choice = prompts.parse_choice(a.get("text", ""), q["shown"])
            unparsed += choice is None
            rows.append({**q, "choice": choice, "correct": None if choice is None else choice == q["intruder"],
                         "answer": a.get("text", "")})
        scored = [r["correct"] for r in rows if r["correct"] is not None]
        chance = mean([1 / r["shown"] for r in rows]) if rows else None
        accuracy = mean([float(c) for c in scored])
        return {"rows": rows, "unparsed": unparsed, "answers": len(rows),
                "metrics": {"accuracy": accuracy, "chance": chance, "n": len(scored)}}
    rows = [{"kind": r["kind"], "label": r["label"], "context": r["context"], "prediction": None, "probability": None}
            for r in plan["rows"]]
    unparsed = 0
    texts = []
    for batch, a in zip(plan["batches"], answers):
        texts.append(a.get("text", ""))
        labels = prompts.parse_binary(a.get("text", ""), len(batch))
        probs = prompts.binary_probabilities(a.get("logprobs"), len(batch))
        if labels is None:
            unparsed += len(batch)
            continue
        for j, i in enumerate(batch):
            rows[i]["prediction"] = labels[j]
            rows[i]["probability"] = probs[j] if probs else None
    parsed = [r for r in rows if r["prediction"] is not None]
    with_p = [r for r in parsed if r["probability"] is not None]
    metrics = classification_metrics([r["label"] for r in parsed], [r["prediction"] for r in parsed])
    metrics["auc"] = roc_auc([r["label"] for r in with_p], [r["probability"] for r in with_p]) if len(with_p) == len(parsed) else None
    return {"rows": rows, "unparsed": unparsed, "answers": len(rows), "replies": texts, "metrics": metrics}


def surprisal(record: dict, explanation: str, lm: Any) -> dict:
    rows = samples(record)
    texts = [plain(r["tokens"]) for r in rows]
    base = lm.losses(f"Description: {BASELINE}\nA text that fits this description:\n", texts)
    expl = lm.losses(f"Description: {explanation}\nA text that fits this description:\n", texts)
    drops = [round(b - e, 6) for b, e in zip(base, expl)]
    labels = [r["label"] for r in rows]
    out_rows = [{"kind": r["kind"], "label": r["label"], "loss_baseline": round(b, 6), "loss_explained": round(e, 6), "drop": d}
                for r, b, e, d in zip(rows, base, expl, drops)]
    active = [d for d, y in zip(drops, labels) if y]
    inactive = [d for d, y in zip(drops, labels) if not y]
    m_a, m_i = mean(active), mean(inactive)
    return {"rows": out_rows, "unparsed": 0, "answers": len(rows),
            "metrics": {"auc": roc_auc(labels, drops), "drop_activating": m_a, "drop_non_activating": m_i,
                        "drop_gap": None if m_a is None or m_i is None else m_a - m_i, "n": len(rows)}}


def embedding(record: dict, explanation: str, embedder: Any) -> dict:
    rows = samples(record)
    vecs = embedder.encode([explanation] + [plain(r["tokens"]) for r in rows])
    sims = [round(float(v), 6) for v in (vecs[1:] @ vecs[0]).tolist()]
    labels = [r["label"] for r in rows]
    return {"rows": [{"kind": r["kind"], "label": r["label"], "similarity": s} for r, s in zip(rows, sims)], "unparsed": 0,
            "answers": len(rows), "metrics": {"auc": roc_auc(labels, sims), "n": len(rows),
                                              "similarity_activating": mean([s for s, y in zip(sims, labels) if y]),
                                              "similarity_non_activating": mean([s for s, y in zip(sims, labels) if not y])}}
