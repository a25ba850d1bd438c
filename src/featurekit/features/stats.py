"""Streaming per-latent statistics for the feature store, from sparse codes, mergeable across processes.

`FeatureStatistics.update(tokens, latents, values)` takes one batch as (token row, latent, value) pairs
(the non-zero codes) plus each row's context, position and token id, and keeps for **every** latent:

- `fires` (tokens where the code is non-zero), `sum`, `max`, `min`;
- `hist`: counts over `BINS` log-spaced bins of |value| from 1e-4 to 1e4 (8 per decade; values outside fall
  in the end bins), positive and negative codes apart (signed codes keep both tails);
- `top` / `bottom`: the `top_n` largest (most negative) activations with where they happened
  (`TopSlots`, ties broken by context then position);
- `sample`: per (latent, sign) the `sample_n` entries with the smallest random keys, a uniform sample of
  its non-zero codes; the activation-quantile bands split it by value into equal-count parts, and each
  band shows its `band_n` entries with the smallest keys (a uniform sample of the band, given the sample);
- `token counts`: how often and how strongly each latent fires on each token id (exact while the distinct
  (latent, token) pairs stay below `token_pairs_cap`; beyond, each latent keeps its `top_tokens` most
  frequent and the counts are marked approximate);
- `co-firing` counts between latents on a hash-sampled `cofire_rate` of the tokens (each token's 32
  strongest codes), the same tokens in every process.

Memory is independent of the number of tokens: O(F · (BINS + sample_n + top_n)) plus the capped pair tables.
Everything is keyed by (context, position), so `merge` of per-rank statistics equals one process's.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import FeaturekitError
from .slots import TopSlots, uniform_key

BINS = 64
LOG_LO, LOG_HI = -4.0, 4.0  # log10 |value| range of the histogram bins
COFIRE_PER_TOKEN = 32  # a token's strongest codes that enter the co-firing counts


def bin_of(values: Tensor) -> Tensor:
    """The histogram bin of each |value|: BINS equal steps of log10 from LOG_LO to LOG_HI, clamped."""
    scaled = (values.abs().clamp_min(1e-30).log10() - LOG_LO) * (BINS / (LOG_HI - LOG_LO))
    return scaled.floor().clamp(0, BINS - 1).long()


def bin_edges() -> list[float]:
    """The BINS + 1 edges of the histogram bins, in activation units."""
    return [10 ** (LOG_LO + i * (LOG_HI - LOG_LO) / BINS) for i in range(BINS + 1)]


class PairCounts:
    """Counts and value sums over int64 keys (latent · V + token, or latent pairs), accumulated in batches and
    consolidated when the pending part grows; above `cap` distinct keys, each row keeps its `keep` largest
    counts (`exact` becomes False)."""

    def __init__(self, row_of_key: int, cap: int, keep: int) -> None:
        self.row_of_key, self.cap, self.keep = row_of_key, cap, keep
        self.keys = torch.zeros(0, dtype=torch.long)
        self.counts = torch.zeros(0, dtype=torch.long)
        self.sums = torch.zeros(0, dtype=torch.float64)
        self.pending: list[tuple[Tensor, Tensor, Tensor]] = []
        self.pending_size = 0
        self.exact = True

    def add(self, keys: Tensor, values: Tensor | None = None) -> None:
        if not keys.numel():
            return
        uniq, inverse = torch.unique(keys, return_inverse=True)
        counts = torch.bincount(inverse, minlength=uniq.numel())
        sums = torch.zeros(uniq.numel(), dtype=torch.float64)
        if values is not None:
            sums.index_add_(0, inverse, values.double())
        self.pending.append((uniq, counts, sums))
        self.pending_size += uniq.numel()
        if self.pending_size > max(self.keys.numel(), 1 << 20):
            self.consolidate()

    def consolidate(self) -> None:
        if not self.pending:
            return
        keys = torch.cat([self.keys, *(p[0] for p in self.pending)])
        counts = torch.cat([self.counts, *(p[1] for p in self.pending)])
        sums = torch.cat([self.sums, *(p[2] for p in self.pending)])
        self.pending, self.pending_size = [], 0
        self.keys, inverse = torch.unique(keys, return_inverse=True)
        self.counts = torch.zeros(self.keys.numel(), dtype=torch.long).index_add_(0, inverse, counts)
        self.sums = torch.zeros(self.keys.numel(), dtype=torch.float64).index_add_(0, inverse, sums)
        if self.keys.numel() > self.cap:
            self._prune()

    def _prune(self) -> None:
        """Keep each row's `keep` largest counts (lossy from here on)."""
        rows = self.keys // self.row_of_key
        order = torch.sort(self.counts, descending=True, stable=True).indices
        order = order[torch.sort(rows[order], stable=True).indices]
        rows = rows[order]
        per_row = torch.bincount(rows)
        rank = torch.arange(rows.numel()) - (torch.cumsum(per_row, 0) - per_row)[rows]
        kept = order[rank < self.keep]
        kept = kept.sort().values
        self.keys, self.counts, self.sums = self.keys[kept], self.counts[kept], self.sums[kept]
        self.exact = False

    def merge(self, other: PairCounts) -> None:
        other.consolidate()
        self.pending.append((other.keys, other.counts, other.sums))
        self.exact = self.exact and other.exact
        self.consolidate()

    def state(self) -> dict[str, Tensor]:
        self.consolidate()
        return {"keys": self.keys, "counts": self.counts, "sums": self.sums, "exact": torch.tensor(self.exact)}

    def load(self, state: dict[str, Tensor]) -> None:
        self.keys, self.counts, self.sums = state["keys"].long(), state["counts"].long(), state["sums"].double()
        self.exact = bool(state["exact"])


class FeatureStatistics:
    """The streaming statistics of `n_latents` latents (module docstring). `signed`: codes of either sign
    (AbsTopK, MP-SAE, ITDA, SNMF) — the negative tail gets its own histogram, examples and band samples.
    `context_len` makes the entry keys (context · T + position); `vocab_size` keys the token counts;
    `cofire_rate` (0–1) is the share of tokens whose co-firing is counted."""

    def __init__(self, n_latents: int, context_len: int, vocab_size: int, *, signed: bool = False, top_n: int = 20,
                 band_n: int = 5, sample_n: int = 100, top_tokens: int = 64, token_pairs_cap: int = 8_000_000, cofire_rate: float = 1.0,
                 cofire_cap: int = 8_000_000) -> None:
        if n_latents < 1 or context_len < 1 or vocab_size < 1:
            raise FeaturekitError(f"FeatureStatistics needs positive sizes, got {n_latents}, {context_len}, {vocab_size}")
        self.n_latents, self.context_len, self.vocab_size, self.signed = n_latents, context_len, vocab_size, signed
        self.top_n, self.band_n, self.sample_n, self.cofire_rate = top_n, band_n, sample_n, cofire_rate
        self.n_tokens = 0
        self.fires = torch.zeros(n_latents, dtype=torch.long)
        self.sum = torch.zeros(n_latents, dtype=torch.float64)
        self.max = torch.full((n_latents,), float("-inf"))
        self.min = torch.full((n_latents,), float("inf"))
        self.hist = torch.zeros(2, n_latents, BINS, dtype=torch.long)  # [positive, negative]
        self.top = TopSlots(n_latents, top_n)
        self.bottom = TopSlots(n_latents, top_n) if signed else None
        self.sample = TopSlots(n_latents * 2, sample_n)  # group = sign · n_latents + latent
        self.tokens = PairCounts(vocab_size, token_pairs_cap, top_tokens)
        self.cofire = PairCounts(n_latents, cofire_cap, 32)
        self.cofire_fires = torch.zeros(n_latents, dtype=torch.long)  # fires on the co-firing sample
        self.cofire_tokens = 0

    # -- one batch -----------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, rows: Tensor, latents: Tensor, values: Tensor, context: Tensor, position: Tensor,
               token_ids: Tensor) -> None:
        """Add a batch of n tokens: `context`, `position`, `token_ids` (n,) per token row, and its non-zero codes
        as pairs `rows` (index into the n tokens), `latents`, `values`."""
        n = context.shape[0]
        rows, latents, values = rows.long().cpu(), latents.long().cpu(), values.float().cpu()
        context, position, token_ids = context.long().cpu(), position.long().cpu(), token_ids.long().cpu()
        if values.numel() and not bool(torch.isfinite(values).all()):
            raise FeaturekitError("the codes hold NaN/Inf values; the dictionary or the activations are broken (evaluate the run)")
        self.n_tokens += n
        self.fires += torch.bincount(latents, minlength=self.n_latents)
        self.sum.index_add_(0, latents, values.double())
        self.max.scatter_reduce_(0, latents, values, "amax")
        self.min.scatter_reduce_(0, latents, values, "amin")
        negative = values < 0
        bins = bin_of(values)
        self.hist.view(-1).index_add_(0, (negative.long() * self.n_latents + latents) * BINS + bins,
                                      torch.ones_like(latents))
        keys = context[rows] * self.context_len + position[rows]
        self.top.offer(latents, values, keys, values)
        if self.bottom is not None:
            self.bottom.offer(latents, -values, keys, values)
        self.sample.offer(negative.long() * self.n_latents + latents, -uniform_key(keys, latents), keys, values)
        self.tokens.add(latents * self.vocab_size + token_ids[rows], values)
        self._cofire(rows, latents, values, context * self.context_len + position)

    def _cofire(self, rows: Tensor, latents: Tensor, values: Tensor, token_keys: Tensor) -> None:
        """Pairs of latents among each sampled token's COFIRE_PER_TOKEN strongest codes."""
        sampled = uniform_key(token_keys, -1) < self.cofire_rate
        self.cofire_tokens += int(sampled.sum())
        keep = sampled[rows]
        rows, latents, values = rows[keep], latents[keep], values[keep]
        if not rows.numel():
            return
        order = torch.sort(values.abs(), descending=True, stable=True).indices
        order = order[torch.sort(rows[order], stable=True).indices]
        rows, latents = rows[order], latents[order]
        per_row = torch.bincount(rows)
        rank = torch.arange(rows.numel()) - (torch.cumsum(per_row, 0) - per_row)[rows]
        strong = rank < COFIRE_PER_TOKEN
        rows, latents = rows[strong], latents[strong]
        self.cofire_fires += torch.bincount(latents, minlength=self.n_latents)
        # every ordered pair (a, b), a ≠ b, of the same row: rows are contiguous after the sort
        counts = torch.bincount(rows)
        counts = counts[counts > 0]
        starts = torch.cumsum(counts, 0) - counts
        a_list, b_list = [], []
        for size in counts.unique().tolist():  # rows of one size at once
            if size < 2:
                continue
            first = starts[counts == size]
            i, j = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
            off = (i != j)
            ii, jj = i[off], j[off]
            a_list.append(latents[(first[:, None] + ii[None]).flatten()])
            b_list.append(latents[(first[:, None] + jj[None]).flatten()])
        if a_list:
            self.cofire.add(torch.cat(a_list) * self.n_latents + torch.cat(b_list))

    # -- processes --------------------------------------------------------------------------------------
    def merge(self, other: FeatureStatistics) -> None:
        """Add another process's statistics of other tokens (same settings): as if one process had seen both."""
        self.n_tokens += other.n_tokens
        self.fires += other.fires
        self.sum += other.sum
        self.max = torch.maximum(self.max, other.max)
        self.min = torch.minimum(self.min, other.min)
        self.hist += other.hist
        self.top.merge(other.top)
        if self.bottom is not None:
            self.bottom.merge(other.bottom)
        self.sample.merge(other.sample)
        self.tokens.merge(other.tokens)
        self.cofire.merge(other.cofire)
        self.cofire_fires += other.cofire_fires
        self.cofire_tokens += other.cofire_tokens

    # -- results --------------------------------------------------------------------------------------
    def density(self) -> Tensor:
        return self.fires.double() / max(self.n_tokens, 1)

    def band_samples(self, latent: int, sign: int = 0, n_bands: int = 5) -> list[list[tuple[float, int, float]]]:
        """`n_bands` activation-quantile bands of the latent's codes of one sign (0: positive, 1: negative), lowest
        |value| first: the uniform sample split by value into equal-count parts, each band's `band_n` entries with
        the smallest random keys, as (score, key, value)."""
        entries = sorted(self.sample.entries(sign * self.n_latents + latent), key=lambda e: (abs(e[2]), e[1]))
        bands = []
        for b in range(n_bands):
            part = entries[b * len(entries) // n_bands:(b + 1) * len(entries) // n_bands]
            bands.append(sorted(part, key=lambda e: (-e[0], e[1]))[: self.band_n])  # smallest key u first
        return bands

    def top_tokens(self, n: int = 10) -> dict[int, list[tuple[int, int, float]]]:
        """latent → its n most frequent tokens as (token id, count, mean value); ties by token id."""
        self.tokens.consolidate()
        keys, counts, sums = self.tokens.keys, self.tokens.counts, self.tokens.sums
        rows = _first_per_row(keys // self.vocab_size, counts, n)
        out: dict[int, list] = {}
        for lat, tok, count, total in zip((keys[rows] // self.vocab_size).tolist(), (keys[rows] % self.vocab_size).tolist(),
                                          counts[rows].tolist(), sums[rows].tolist()):
            out.setdefault(lat, []).append((tok, count, total / count))
        return out

    def cofiring(self, n: int = 10, min_count: int = 2) -> dict[int, list[tuple[int, float, int]]]:
        """latent → up to n latents it fires with most, as (latent, Jaccard on the sampled tokens, count)."""
        self.cofire.consolidate()
        a, b = self.cofire.keys // self.n_latents, self.cofire.keys % self.n_latents
        count = self.cofire.counts
        keep = count >= min_count
        a, b, count = a[keep], b[keep], count[keep]
        jaccard = count.double() / (self.cofire_fires[a] + self.cofire_fires[b] - count).clamp_min(1).double()
        rows = _first_per_row(a, jaccard, n)
        out: dict[int, list] = {}
        for lat, other, jac, c in zip(a[rows].tolist(), b[rows].tolist(), jaccard[rows].tolist(), count[rows].tolist()):
            out.setdefault(lat, []).append((other, round(jac, 4), c))
        return out

    def histogram(self, latent: int) -> dict[str, list[int]]:
        return {"positive": self.hist[0, latent].tolist(), "negative": self.hist[1, latent].tolist()}


def cofire_rate_for(tokens: int, budget: int) -> float:
    """The share of tokens sampled for co-firing so that about `budget` tokens are counted."""
    return 1.0 if tokens <= budget else max(budget / tokens, 1e-6)


def _first_per_row(rows: Tensor, score: Tensor, n: int) -> Tensor:
    """Indices of each row's n largest scores (ties: the earlier index), grouped by row, best first."""
    order = torch.sort(score, descending=True, stable=True).indices
    order = order[torch.sort(rows[order], stable=True).indices]
    sorted_rows = rows[order]
    per_row = torch.bincount(sorted_rows) if sorted_rows.numel() else torch.zeros(0, dtype=torch.long)
    rank = torch.arange(sorted_rows.numel()) - (torch.cumsum(per_row, 0) - per_row)[sorted_rows]
    return order[rank < n]
