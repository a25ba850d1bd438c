"""The evaluation suite at matched L0 on the frontier: per method, the trained point nearest `target_l0`
gets sparse probing (BBC topics), first-letter absorption and KL-matched steering, with the functions of
`featurekit eval --suite` (evaluate/probing.py, evaluate/absorption.py, evaluate/kl_steering.py) at settings
sized for a CPU (`SuiteSettings`).

The model's work is shared: the documents, the words and the held-out tokens run through the model once,
and each dictionary only encodes those activations (probing: `StackedEncoder` encodes every dictionary at
once inside `pooled_documents`); steering evaluates every method's feature directions and the random
baseline directions in one KL-matched search, so all methods are measured on the same prompts and targets.
Results go to suite.json beside results.json, one entry per (method, evaluation), written after each, so a
rerun skips what is done; seconds are measured per evaluation (shared model work and per-dictionary work).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write_json, read_json
from ..data.sources import labelled_documents
from ..dictionaries import Dictionary
from ..evaluate.absorption import AbsorptionSettings, first_letter_absorption
from ..evaluate.first_letter import LETTERS, alpha_tokens, split_words, word_activations
from ..evaluate.kl_steering import SteeringProbe, choose_features, kl_matched, random_directions
from ..evaluate.probing import pooled_documents, probe_accuracies
from ..pipeline.probing import first_per_class

EVALUATIONS = ("probing", "absorption", "steering")


@dataclass
class SuiteSettings:
    """CPU-sized settings of the suite on the frontier (the `featurekit eval` defaults in brackets)."""

    target_l0: float = 32.0  #: each method's point nearest this L0 (in log distance) is evaluated
    evaluations: tuple[str, ...] = EVALUATIONS
    probing_train_docs: int = 40  #: BBC articles per topic for training the probes [200]
    probing_test_docs: int = 20  #: held-out articles per topic at most [100]
    probing_tokens: int = 64  #: tokens per article [128]
    probing_ks: tuple[int, ...] = (1, 5)  #: k of the k-sparse probes [1, 2, 5, 20]
    absorption_words: int = 1500  #: single-token words [4,000]
    absorption_icl: int = 10
    absorption_words_per_sequence: int = 40
    absorption_max_k: int = 10
    absorption_l1_steps: int = 300
    steering_features: int = 4  #: features per method, each steered with both signs [4]
    steering_random: int = 4  #: random baseline directions, both signs [4, plus difference of means and PCA]
    steering_targets: tuple[float, ...] = (1.0,)  #: target KLs in nats [0.5, 1, 2]
    steering_prompts: int = 2  #: held-out prompts [4]
    steering_prompt_tokens: int = 16  #: tokens per prompt [16]
    steering_tokens: int = 4096  #: held-out tokens that choose the features and set the strength unit [4,096]
    top_tokens: int = 10
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """As JSON stores it (tuples as lists), so a stored copy compares equal."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def full(cls, **options: Any) -> SuiteSettings:
        """The `featurekit eval` defaults (probing 200 / 100 articles × 128 tokens, k 1, 2, 5, 20; 4,000 words;
        steering at KL 0.5, 1 and 2 on 4 prompts)."""
        return cls(probing_train_docs=200, probing_test_docs=100, probing_tokens=128, probing_ks=(1, 2, 5, 20),
                   absorption_words=4000, steering_targets=(0.5, 1.0, 2.0), steering_prompts=4, **options)


class StackedEncoder:
    """`encode` = the codes of several dictionaries side by side, so one pass over the model serves them all."""

    def __init__(self, dictionaries: Sequence[Dictionary]):
        self.dictionaries = list(dictionaries)
        self.widths = [d.n_latents for d in self.dictionaries]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([d.encode(x).float() for d in self.dictionaries], dim=-1)

    def split(self, codes: torch.Tensor) -> list[torch.Tensor]:
        return list(codes.split(self.widths, dim=-1))


def matched_points(rows: list[dict], target_l0: float) -> dict[str, dict]:
    """Per method, the scored row nearest `target_l0` in log distance."""
    best: dict[str, dict] = {}
    for r in rows:
        if "error" in r or r.get("l0", 0) <= 0:
            continue
        cur = best.get(r["method"])
        if cur is None or abs(math.log(r["l0"] / target_l0)) < abs(math.log(cur["l0"] / target_l0)):
            best[r["method"]] = r
    return best


def run_suite(path: Path, dictionaries: dict[str, Dictionary], loaded, site: str, heldout: torch.Tensor, prompts: torch.Tensor,
              settings: SuiteSettings, policy: dict, log: Callable[[str], None]) -> dict:
    """The suite on `dictionaries` (method → dictionary), resumable in `path` (suite.json); returns its content.
    `heldout`: (N, d) kept held-out activations at `site`; `prompts`: (n, T) held-out token ids."""
    state = read_json(path) if path.is_file() else {}
    if state.get("settings") != settings.to_dict():
        state = {"settings": settings.to_dict(), "results": {}, "seconds": {}}
    results, seconds = state["results"], state["seconds"]

    def save() -> None:
        atomic_write_json(path, state)

    for evaluation in settings.evaluations:
        todo = {m: d for m, d in dictionaries.items() if evaluation not in results.get(m, {})}
        if not todo:
            continue
        start = time.perf_counter()
        run = {"probing": _probing, "absorption": _absorption, "steering": _steering}[evaluation]
        shared, per_method = run(todo, loaded, site, heldout, prompts, settings, policy)
        for method, value in per_method.items():
            results.setdefault(method, {})[evaluation] = value
        seconds[evaluation] = {"total": round(time.perf_counter() - start, 1), "shared_model_work": round(shared, 1),
                               "dictionaries": len(todo)}
        log(f"suite {evaluation}: {len(todo)} dictionaries in {seconds[evaluation]['total']} s "
            f"({seconds[evaluation]['shared_model_work']} s of it running the model)")
        save()
    return state


def _probing(dictionaries, loaded, site, heldout, prompts, s: SuiteSettings, policy) -> tuple[float, dict]:
    stacked = StackedEncoder(list(dictionaries.values()))
    start = time.perf_counter()
    pooled = {}
    for split, per_class in (("train", s.probing_train_docs), ("test", s.probing_test_docs)):
        docs, labels = first_per_class(labelled_documents("bbc_topic", split), per_class)
        dense, codes, kept = pooled_documents(loaded.model, loaded.tokenizer, stacked, site, docs, s.probing_tokens,
                                              batch_size=16, exclude_first=policy["exclude_first"],
                                              exclude_special=policy["exclude_special"],
                                              max_norm_multiple=policy["max_norm_multiple"])
        pooled[split] = (dense, stacked.split(codes), [labels[i] for i in kept])
    shared = time.perf_counter() - start
    (dense_tr, codes_tr, y_tr), (dense_te, codes_te, y_te) = pooled["train"], pooled["test"]
    out = {}
    for i, method in enumerate(dictionaries):
        t = time.perf_counter()
        acc = probe_accuracies((dense_tr, codes_tr[i]), (dense_te, codes_te[i]), y_tr, y_te, list(s.probing_ks), seed=s.seed)
        out[method] = {**acc["mean"], "n_train_documents": len(y_tr), "n_test_documents": len(y_te),
                       "seconds": round(time.perf_counter() - t, 1)}
    return shared, out


def _absorption(dictionaries, loaded, site, heldout, prompts, s: SuiteSettings, policy) -> tuple[float, dict]:
    start = time.perf_counter()
    train_words, test_words = split_words(alpha_tokens(loaded.tokenizer), s.absorption_words, 0.8, s.seed)
    acts = [word_activations(loaded.model, loaded.tokenizer, site, words, s.absorption_icl, s.absorption_words_per_sequence,
                             s.seed, batch_size=16) for words in (train_words, test_words)]
    shared = time.perf_counter() - start
    settings = AbsorptionSettings(max_k=s.absorption_max_k, l1_steps=s.absorption_l1_steps)
    out = {}
    for method, sae in dictionaries.items():
        t = time.perf_counter()
        with torch.no_grad():
            (x_tr, y_tr), (x_te, y_te) = acts
            c_tr, c_te = (torch.cat([sae.encode(x[i:i + 1024]).float() for i in range(0, len(x), 1024)]) for x in (x_tr, x_te))
        result = first_letter_absorption(x_tr, c_tr, y_tr, x_te, c_te, y_te, sae.W_dec.detach().float().cpu(), LETTERS, settings)
        out[method] = {**(result["mean"] or {}), "n_scored_letters": result["n_scored_letters"],
                       "n_words": len(train_words) + len(test_words), "seconds": round(time.perf_counter() - t, 1)}
    return shared, out


def _steering(dictionaries, loaded, site, heldout, prompts, s: SuiteSettings, policy) -> tuple[float, dict]:
    x = heldout[:s.steering_tokens]
    scale = float(x.norm(dim=1).mean())
    labels, vectors = [], []
    for method, sae in dictionaries.items():
        with torch.no_grad():
            codes = torch.cat([sae.encode(x[i:i + 1024]).float() for i in range(0, len(x), 1024)])
        features = choose_features(codes, s.steering_features, s.seed)
        labels += [(method, f) for f in features]
        vectors.append(sae.W_dec.detach().float().cpu()[features])
    labels += [("random", i) for i in range(s.steering_random)]
    vectors.append(random_directions(x.shape[1], s.steering_random, s.seed))
    directions = torch.cat(vectors)
    signed = torch.cat([directions, -directions])
    signs = [1] * len(labels) + [-1] * len(labels)
    labels = labels + labels
    start = time.perf_counter()
    probe = SteeringProbe(loaded.model, site, prompts[:s.steering_prompts, :s.steering_prompt_tokens], signed, scale,
                          top_tokens=s.top_tokens, rows_per_pass=32)
    found = kl_matched(probe, list(s.steering_targets))
    shared = time.perf_counter() - start
    out = {}
    for method in list(dictionaries) + ["random"]:
        rows = [i for i, (m, _) in enumerate(labels) if m == method]
        entry: dict[str, Any] = {"directions": len(rows), "features": sorted({labels[i][1] for i in rows}),
                                 "strength_unit": scale, "model_evaluations": probe.evaluations}
        for t, target in enumerate(s.steering_targets):
            hit = [i for i in rows if bool(found["reached"][i, t])]
            key = f"{target:g}"
            entry[f"fraction_reached_kl_{key}"] = len(hit) / max(1, len(rows))
            for name in ("prob_gain", "log_rank_gain", "r"):
                values = [float(found[name][i, t]) for i in hit]
                entry[f"{'strength' if name == 'r' else name}_at_kl_{key}"] = sum(values) / len(values) if values else None
            entry[f"per_direction_kl_{key}"] = [{"feature": labels[i][1], "sign": signs[i], "reached": bool(found["reached"][i, t]),
                                                 "log_rank_gain": float(found["log_rank_gain"][i, t]),
                                                 "prob_gain": float(found["prob_gain"][i, t])} for i in rows]
        out[method] = entry
    return shared, out
