"""Scorer maths on hand-built cases: a perfect judge scores balanced accuracy 1, a constant one 0.5 whatever the
class balance; AUC equals its definition on known scores (ties one half); the bootstrap is seeded; unparseable
answers are counted and left out of the metrics; log-probabilities give the AUC."""

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from featurekit.autointerp import scorers
from featurekit.autointerp.metrics import bootstrap_ci, classification_metrics, roc_auc, summarise
from featurekit.autointerp.prompts import binary_probabilities


def test_perfect_and_constant_answers():
    labels = [1, 1, 1, 0, 0, 0, 0, 0]
    perfect = classification_metrics(labels, labels)
    assert perfect["balanced_accuracy"] == 1.0 and perfect["f1"] == 1.0 and perfect["accuracy"] == 1.0
    always = classification_metrics(labels, [1] * 8)
    assert always["balanced_accuracy"] == 0.5 and always["recall"] == 1.0 and always["specificity"] == 0.0
    assert always["f1"] == pytest.approx(2 * (3 / 8) / (3 / 8 + 1))
    never = classification_metrics(labels, [0] * 8)
    assert never["balanced_accuracy"] == 0.5 and never["f1"] == 0.0 and never["precision"] is None
    inverted = classification_metrics(labels, [1 - y for y in labels])
    assert inverted["balanced_accuracy"] == 0.0
    assert classification_metrics([1, 1], [1, 0])["balanced_accuracy"] is None  # no negatives: undefined, not made up
    assert classification_metrics([], [])["n"] == 0


def test_auc_on_known_scores():
    assert roc_auc([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.8, 0.9]) == 0.0
    assert roc_auc([1, 0], [0.5, 0.5]) == 0.5
    # 3 positives x 2 negatives = 6 pairs: wins (0.9>0.3, 0.9>0.5, 0.5>0.3) = 3, tie (0.5 vs 0.5) = 0.5, losses 2
    assert roc_auc([1, 1, 1, 0, 0], [0.9, 0.5, 0.1, 0.3, 0.5]) == pytest.approx(3.5 / 6)
    assert roc_auc([1, 1], [0.2, 0.3]) is None


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=30))
def test_auc_is_the_pairwise_probability(pairs):
    labels, scores = [p[0] for p in pairs], [float(p[1]) for p in pairs]
    pos = [s for y, s in zip(labels, scores) if y]
    neg = [s for y, s in zip(labels, scores) if not y]
    if not pos or not neg:
        assert roc_auc(labels, scores) is None
        return
    brute = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a in pos for b in neg) / (len(pos) * len(neg))
    assert roc_auc(labels, scores) == pytest.approx(brute)


def test_bootstrap_is_seeded_and_brackets_the_mean():
    rng = random.Random(3)
    values = [rng.random() for _ in range(40)]
    lo, hi = bootstrap_ci(values, seed=7)
    assert lo < sum(values) / len(values) < hi
    assert bootstrap_ci(values, seed=7) == (lo, hi)
    assert bootstrap_ci([0.5]) is None
    s = summarise([0.2, None, 0.4, 0.6])
    assert s["n"] == 3 and s["missing"] == 1 and s["mean"] == pytest.approx(0.4)


def record(n_active=3, n_negative=3):
    win = {"tokens": ["a", "b", "c", "d"], "acts": [0.0, 2.0, 0.5, 0.0], "kind": "top", "context": 0, "start": 0, "peak": 1}
    neg = {"tokens": ["w", "x", "y", "z"], "acts": [0.0] * 4, "kind": "random", "context": 1, "start": 0, "peak": None}
    return {"unit": 5, "test": [dict(win) for _ in range(n_active)], "negatives": [dict(neg) for _ in range(n_negative)]}


def answers_for(plan, answer):
    """Hand-written judge answers: `answer(labels of the batch) -> text`."""
    return [{"text": answer([plan["rows"][i]["label"] for i in batch]), "logprobs": None, "usage": None} for batch in plan["batches"]]


@pytest.mark.parametrize("scorer", ["detection", "fuzzing"])
@pytest.mark.parametrize("shown", [1, 3])
def test_judge_scorers_on_hand_written_answers(scorer, shown):
    rec = record(3, 5)
    reqs, plan = scorers.requests(scorer, rec, "letters", scorers.ScoreSettings(n_shown=shown), seed=0)
    assert len(reqs) == math.ceil(8 / shown)
    fmt = (lambda ys: str(ys[0])) if shown == 1 else (lambda ys: "[" + ", ".join(map(str, ys)) + "]")
    perfect = scorers.finish(scorer, plan, answers_for(plan, fmt))
    assert perfect["metrics"]["balanced_accuracy"] == 1.0 and perfect["unparsed"] == 0
    constant = scorers.finish(scorer, plan, answers_for(plan, lambda ys: fmt([1] * len(ys))))
    assert constant["metrics"]["balanced_accuracy"] == 0.5
    garbled = answers_for(plan, fmt)
    garbled[0]["text"] = "I cannot tell."
    partial = scorers.finish(scorer, plan, garbled)
    assert partial["unparsed"] == len(plan["batches"][0]) and partial["metrics"]["n"] == 8 - len(plan["batches"][0])
    assert sum(r["prediction"] is None for r in partial["rows"]) == partial["unparsed"]


def test_logprobs_give_the_auc():
    rec = record(2, 2)
    _, plan = scorers.requests("detection", rec, "letters", scorers.ScoreSettings(n_shown=1), seed=0)
    answers = []
    for (i,) in plan["batches"]:
        p1 = 0.9 if plan["rows"][i]["label"] else 0.3  # the judge leans the right way with graded confidence
        answers.append({"text": "1", "usage": None,
                        "logprobs": [{"token": "1", "top": [["1", math.log(p1)], ["0", math.log(1 - p1)], ["the", -9.0]]}]})
    out = scorers.finish("detection", plan, answers)
    assert out["metrics"]["auc"] == 1.0 and out["metrics"]["balanced_accuracy"] == 0.5
    assert binary_probabilities([{"token": " 1", "top": [[" 1", math.log(0.6)], ["0", math.log(0.2)]]}], 1) == [pytest.approx(0.75)]
    assert binary_probabilities(None, 1) is None


def test_intruder_accuracy_against_chance():
    rec = record(6, 4)
    reqs, plan = scorers.requests("intruder", rec, None, scorers.ScoreSettings(n_intruder=4, intruder_shown=3), seed=0)
    assert len(reqs) == 4 and all(q["shown"] == 3 for q in plan["questions"])
    right = scorers.finish("intruder", plan, [{"text": f"Excerpt {q['intruder']}"} for q in plan["questions"]])
    assert right["metrics"]["accuracy"] == 1.0 and right["metrics"]["chance"] == pytest.approx(1 / 3)
    wrong = scorers.finish("intruder", plan, [{"text": "7"} for _ in plan["questions"]])  # out of range: unparseable
    assert wrong["unparsed"] == 4 and wrong["metrics"]["accuracy"] is None
