"""Example construction: for each unit, the excerpts its explainer reads and the labelled excerpts its scorers test.

Windows are `window_left` tokens before the activation and `window_right` after (32 in all by default, as
delphi's windows; shifted to stay inside the context).

- **Activating** — a feature's from the feature store: its top examples (largest activations) and its samples of
  the five activation-quantile bands; a control's from the pool, chosen the same way. The explanation set is
  the top examples at even ranks (0, 2, 4, …, `n_explain` of them: OpenAI's neuron-explainer explains from top
  activations); the test set takes the other top examples and the band samples in turn (top, band4 … band0),
  so scoring covers weak activations too (delphi's quantile sampling). No window is in both, and a window
  repeated in the corpus (the same tokens around the same position) counts once.
- **Non-activating** (from the pool, the unit silent on every token of the window):
  `random` — random pool windows; `neighbour` — windows around the strongest activations of the unit's
  neighbours (decoder-cosine neighbours and co-firing partners from the store; for controls the most similar
  directions), where the unit itself is silent: hard negatives that share the neighbour's pattern;
  `semantic` — the silent pool windows most similar, by MiniLM sentence embedding, to the unit's explanation
  set (delphi's FAISS hard negatives).

A unit with fewer than `min_explain` explanation or `min_test` test excerpts is skipped and counted as such.
Every random choice uses `random.Random(f"{seed}:{stage}:{unit}")`: the same settings give the same examples.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch

from .text import plain

N_BANDS = 5
VERSION = 1  #: part of the examples' identity (settings.json): a change of these rules never mixes with old examples


@dataclass
class ExampleSettings:
    window_left: int = 23
    window_right: int = 8
    n_explain: int = 10
    n_test: int = 20
    n_random: int = 10
    n_neighbour: int = 5
    n_semantic: int = 5
    min_explain: int = 3
    min_test: int = 4
    neighbours: int = 5  #: neighbour units whose activations give hard negatives
    semantic_candidates: int = 256  #: silent pool windows ranked by similarity for the semantic negatives

    @property
    def width(self) -> int:
        return self.window_left + 1 + self.window_right


def span(position: int, length: int, s: ExampleSettings) -> tuple[int, int]:
    """[start, stop) of the window around `position` in a context of `length` tokens."""
    width = min(s.width, length)
    start = max(0, min(position - s.window_left, length - width))
    return start, start + width


def cut(tokens: list[str], acts: list[float], position: int, s: ExampleSettings, **extra: Any) -> dict:
    start, stop = span(position, len(tokens), s)
    return {"start": start, "tokens": tokens[start:stop], "acts": [float(a) for a in acts[start:stop]],
            "peak": position - start, "value": float(acts[position]), **extra}


def store_activating(page: dict, s: ExampleSettings) -> dict[str, list[dict]]:
    """A store feature's positive examples as windows, by kind (top, band0..band4)."""
    out: dict[str, list[dict]] = {}
    for kind in ["top"] + [f"band{b}" for b in range(N_BANDS)]:
        for e in page["examples"].get(kind, []):
            if e["value"] > 0:
                out.setdefault(kind, []).append(cut(e["tokens"], e["acts"], e["position"], s, context=e["context"], kind=kind,
                                                    source="store"))
    return out


def pool_activating(pool: Any, unit: int, s: ExampleSettings, top_n: int, band_n: int, rng: random.Random) -> dict[str, list[dict]]:
    """A unit's positive examples from the pool, chosen like the store's: the peaks of the `top_n` contexts with
    the largest values, and `band_n` seeded samples of each of five equal-count bands of its non-zero values."""
    acts = pool.acts(unit)
    out: dict[str, list[dict]] = {}
    peak, where = acts.max(dim=1)
    order = sorted((i for i in range(len(peak)) if peak[i] > 0), key=lambda i: (-float(peak[i]), i))[:top_n]
    out["top"] = [_pool_window(pool, acts, r, int(where[r]), s, "top") for r in order]
    rows, cols = acts.nonzero(as_tuple=True)
    if len(rows):
        vals = acts[rows, cols]
        order_all = torch.argsort(vals, stable=True).tolist()
        n = len(order_all)
        for b in range(N_BANDS):
            members = order_all[b * n // N_BANDS:(b + 1) * n // N_BANDS]
            picks = rng.sample(members, min(band_n, len(members)))
            out[f"band{b}"] = [_pool_window(pool, acts, int(rows[i]), int(cols[i]), s, f"band{b}") for i in sorted(picks)]
    return out


def _pool_window(pool: Any, acts: torch.Tensor, row: int, position: int, s: ExampleSettings, kind: str, **extra: Any) -> dict:
    T = pool.shape[1]
    start, stop = span(position, T, s)
    return {"context": row, "start": start, "tokens": pool.tokens(row, start, stop),
            "acts": acts[row, start:stop].tolist(), "peak": position - start,
            "value": float(acts[row, position]), "kind": kind, "source": "pool", **extra}


def _same(w: dict) -> tuple:
    """Windows with the same tokens and peak are one example (a corpus may hold a text twice)."""
    return tuple(w["tokens"]), w["peak"]


def split(activating: dict[str, list[dict]], s: ExampleSettings) -> tuple[list[dict], list[dict]]:
    """(explanation set, test set) from windows by kind (module docstring); repeated windows are dropped."""
    top = activating.get("top", [])
    explain: list[dict] = []
    for w in top[0::2]:
        if len(explain) < s.n_explain and _same(w) not in {_same(x) for x in explain}:
            explain.append(w)
    taken = {_same(w) for w in explain}
    chosen = {id(w) for w in explain}
    groups = [[w for w in top if id(w) not in chosen]] + [list(activating.get(f"band{b}", [])) for b in reversed(range(N_BANDS))]
    test: list[dict] = []
    while len(test) < s.n_test and any(groups):
        for g in groups:
            while g:
                w = g.pop(0)
                if _same(w) not in taken:
                    taken.add(_same(w))
                    test.append(w)
                    break
            if len(test) == s.n_test:
                break
    return explain, test


def tiles(pool: Any, s: ExampleSettings) -> list[tuple[int, int]]:
    """(row, start) of the pool's non-overlapping windows: the candidates of random and semantic negatives."""
    T = pool.shape[1]
    width = min(s.width, T)
    return [(r, st) for r in range(pool.shape[0]) for st in range(0, T - width + 1, width)]


def silent(acts: torch.Tensor, row: int, start: int, stop: int) -> bool:
    return bool((acts[row, start:stop] <= 0).all())


def negatives(pool: Any, unit: int, neighbours: list[int], explain: list[dict], s: ExampleSettings, rng: random.Random,
              embedder: Any = None, tile_vectors: torch.Tensor | None = None) -> list[dict]:
    """Non-activating windows of the unit: random, neighbour and semantic ones (module docstring)."""
    acts = pool.acts(unit)
    width = min(s.width, pool.shape[1])
    quiet = [(r, st) for r, st in tiles(pool, s) if silent(acts, r, st, st + width)]
    out, used = [], set()

    def add(row: int, start: int, kind: str, **extra: Any) -> None:
        used.add((row, start))
        out.append({"context": row, "start": start, "tokens": pool.tokens(row, start, start + width), "acts": [0.0] * width,
                    "peak": None, "value": 0.0, "kind": kind, "source": "pool", **extra})

    for row, start in rng.sample(quiet, min(s.n_random, len(quiet))):
        add(row, start, "random")
    # neighbour negatives: round-robin over the neighbours' strongest silent-for-this-unit windows
    queues = []
    for v in neighbours[:s.neighbours]:
        if v not in pool.units:
            continue
        other = pool.acts(v)
        peak, where = other.max(dim=1)
        rows = sorted((r for r in range(len(peak)) if peak[r] > 0), key=lambda r: (-float(peak[r]), r))
        queues.append((v, other, [(r, int(where[r])) for r in rows]))
    taken = 0
    while taken < s.n_neighbour and any(q for _, _, q in queues):
        for v, other, q in queues:
            while q:
                row, position = q.pop(0)
                start, stop = span(position, pool.shape[1], s)
                if (row, start) not in used and silent(acts, row, start, stop):
                    marks = [i for i, a in enumerate(other[row, start:stop].tolist()) if a > 0]
                    add(row, start, "neighbour", partner=v, marks=marks)
                    taken += 1
                    break
            if taken == s.n_neighbour:
                break
    if s.n_semantic and embedder is not None and explain:
        index = {t: i for i, t in enumerate(tiles(pool, s))}
        candidates = [t for t in quiet if t not in used]
        candidates = rng.sample(candidates, min(s.semantic_candidates, len(candidates)))
        if candidates:
            query = torch.nn.functional.normalize(embedder.encode([plain(w["tokens"]) for w in explain]).mean(0), dim=0)
            vecs = tile_vectors[[index[t] for t in candidates]]
            sims = (vecs @ query).tolist()
            ranked = sorted(range(len(candidates)), key=lambda i: (-sims[i], candidates[i]))[:s.n_semantic]
            for i in ranked:
                add(*candidates[i], "semantic", similarity=round(sims[i], 6))
    return out


def tile_embeddings(pool: Any, s: ExampleSettings, embedder: Any) -> torch.Tensor:
    """MiniLM vectors of every pool tile (row, start), in `tiles` order."""
    width = min(s.width, pool.shape[1])
    return embedder.encode([plain(pool.tokens(r, st, st + width)) for r, st in tiles(pool, s)])


def build_record(unit: int, activating: dict[str, list[dict]], pool: Any, neighbours: list[int], s: ExampleSettings, seed: int,
                 promoted: list[str], embedder: Any = None, tile_vectors: torch.Tensor | None = None) -> dict:
    """One unit's examples: {unit, explain, test, negatives, promoted, skipped (reason or None)}."""
    explain, test = split({k: list(v) for k, v in activating.items()}, s)
    record = {"unit": int(unit), "explain": explain, "test": test, "negatives": [], "promoted": promoted, "skipped": None}
    if len(explain) < s.min_explain or len(test) < s.min_test:
        record["skipped"] = (f"too few activating examples ({len(explain)} to explain, {len(test)} to test; "
                             f"need {s.min_explain} and {s.min_test})")
        return record
    rng = random.Random(f"{seed}:negatives:{unit}")
    record["negatives"] = negatives(pool, unit, neighbours, explain, s, rng, embedder, tile_vectors)
    if not record["negatives"]:
        record["skipped"] = "no silent pool window to use as a non-activating example"
    return record
