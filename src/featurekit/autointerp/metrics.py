"""Scores of a judge's answers, as pure functions (no judge, no I/O).

A judge labels examples: 1 ("the explanation applies / the marks are right") or 0. The truth is 1 for an
activating example and 0 for a non-activating one. Positive class: activating.

    precision = TP / (TP + FP)                recall (true positive rate) = TP / (TP + FN)
    F1 = 2 · precision · recall / (precision + recall)   (0 when both are 0)
    specificity (true negative rate) = TN / (TN + FP)
    balanced accuracy = (recall + specificity) / 2        (delphi reports this as "accuracy")
    AUC = P(score of a random positive > score of a random negative) + ½ P(tie)   (Mann–Whitney U / (n₊ n₋))

A perfect judge scores balanced accuracy 1; a constant answer scores 0.5 whatever the class balance
(recall 1 and specificity 0, or the reverse), which is why it is preferred over plain accuracy.
Undefined values (no positives, no negatives, no answers) are None, never a made-up number.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def confusion(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, int]:
    """Counts of true/false positives/negatives of 0/1 `predictions` against 0/1 `labels`."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    tp = sum(1 for y, p in zip(labels, predictions) if y and p)
    fp = sum(1 for y, p in zip(labels, predictions) if not y and p)
    fn = sum(1 for y, p in zip(labels, predictions) if y and not p)
    tn = sum(1 for y, p in zip(labels, predictions) if not y and not p)
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def classification_metrics(labels: Sequence[int], predictions: Sequence[int],
                           probabilities: Sequence[float] | None = None) -> dict:
    """Precision, recall, specificity, F1, balanced accuracy, accuracy (and AUC from `probabilities`, the judge's
    P(1) per example, when given) of one set of answers (module docstring)."""
    c = confusion(labels, predictions)
    precision = _ratio(c["tp"], c["tp"] + c["fp"])
    recall = _ratio(c["tp"], c["tp"] + c["fn"])
    specificity = _ratio(c["tn"], c["tn"] + c["fp"])
    f1 = None
    if recall is not None:
        p = precision or 0.0
        f1 = 2 * p * recall / (p + recall) if p + recall > 0 else 0.0
    balanced = (recall + specificity) / 2 if recall is not None and specificity is not None else None
    out = {**c, "n": len(labels), "precision": precision, "recall": recall, "specificity": specificity, "f1": f1,
           "balanced_accuracy": balanced, "accuracy": _ratio(c["tp"] + c["tn"], len(labels))}
    out["auc"] = roc_auc(labels, probabilities) if probabilities is not None else None
    return out


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float | None:
    """Area under the ROC curve of `scores` for 0/1 `labels`: the Mann–Whitney U statistic over n₊ n₋, ties
    counting one half. None without both classes."""
    if len(labels) != len(scores):
        raise ValueError(f"{len(labels)} labels but {len(scores)} scores")
    pos = sorted(float(s) for y, s in zip(labels, scores) if y)
    neg = sorted(float(s) for y, s in zip(labels, scores) if not y)
    if not pos or not neg:
        return None
    # ranks with ties averaged, over both groups together
    values = sorted([(v, 1) for v in pos] + [(v, 0) for v in neg])
    rank_sum, i = 0.0, 0
    while i < len(values):
        j = i
        while j < len(values) and values[j][0] == values[i][0]:
            j += 1
        mean_rank = (i + 1 + j) / 2  # ranks i+1 .. j
        rank_sum += mean_rank * sum(flag for _, flag in values[i:j])
        i = j
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def bootstrap_ci(values: Sequence[float], *, level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap confidence interval of the mean of `values` (units resampled with replacement,
    `resamples` times, seeded: the same values give the same interval). None for fewer than two values."""
    vals = [float(v) for v in values]
    if len(vals) < 2:
        return None
    rng = random.Random(seed)
    n = len(vals)
    means = sorted(sum(vals[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    lo = means[max(0, math.floor((1 - level) / 2 * resamples))]
    hi = means[min(resamples - 1, math.ceil((1 + level) / 2 * resamples) - 1)]
    return lo, hi


def summarise(values: Sequence[float | None], *, seed: int = 0, resamples: int = 2000) -> dict:
    """{mean, ci95, n, missing} of per-unit values (None: the metric was undefined for that unit)."""
    present = [float(v) for v in values if v is not None]
    ci = bootstrap_ci(present, seed=seed, resamples=resamples)
    return {"mean": mean(present), "ci95": list(ci) if ci else None, "n": len(present), "missing": len(values) - len(present)}
