"""Per-feature statistics and top-activating examples, computed in one streaming pass.

`FeatureStats` sees the dictionary codes batch by batch and keeps, for every latent:

- ``counts[f]``  number of tokens where ``codes[:, f] != 0`` (signed codes count when non-zero);
- ``max_act[f]`` the largest activation seen (0 while none was positive);
- the ``top_n`` largest *positive* activations with where they happened: ``(value, context_idx, position)``.

Density is ``counts / n_tokens`` (the firing fraction over every token seen). Memory is
O(F · top_n): codes are never stored. Ties are broken deterministically — for equal values the
smaller ``context_idx`` wins, then the smaller ``position`` — so the result does not depend on
how the stream is cut into batches nor on the order of tokens inside a batch.

`build_examples` turns the top lists into the JSON the report renders: a token window around each
peak and this latent's activation on every shown token, recomputed for the few contexts needed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from featurekit._io import atomic_write_json
from featurekit.errors import FeaturekitError

ActivationFn = Callable[[Tensor], Tensor]
"""``activation_fn(context_indices: LongTensor (m,)) -> codes (m, T, F)`` for those contexts."""


class FeatureStats:
    """Streaming firing counts, max activations and top-``top_n`` examples for ``n_latents`` latents.

    State lives on ``device`` (default CPU) whatever device the codes come from; only the few
    candidate entries of each batch cross devices. Batches are processed in row chunks of about
    ``chunk_elements`` codes, which bounds the temporary memory of one update.
    """

    chunk_elements = 1 << 22

    def __init__(self, n_latents: int, top_n: int = 10, device: str | torch.device = "cpu") -> None:
        if n_latents <= 0 or top_n <= 0:
            raise FeaturekitError(
                f"FeatureStats needs n_latents > 0 and top_n > 0, got {n_latents} and {top_n}; "
                "pass the dictionary's n_latents and a positive number of examples"
            )
        self.n_latents = int(n_latents)
        self.top_n = int(top_n)
        self.device = torch.device(device)
        self.n_tokens = 0
        self.counts = torch.zeros(n_latents, dtype=torch.long, device=self.device)
        self.max_act = torch.zeros(n_latents, dtype=torch.float32, device=self.device)
        # Top lists, each row sorted by (value desc, context asc, position asc); empty slots have ctx -1.
        self.top_values = torch.zeros(n_latents, top_n, dtype=torch.float32, device=self.device)
        self.top_context = torch.full((n_latents, top_n), -1, dtype=torch.long, device=self.device)
        self.top_position = torch.full((n_latents, top_n), -1, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def update(self, codes: Tensor, context_idx: Tensor, position: Tensor) -> None:
        """Add a batch: ``codes`` (n, F), and for each row its ``context_idx`` (n,) and ``position`` (n,),
        both non-negative (the row's context in the packed ``input_ids`` and its index in that context)."""
        if codes.dim() != 2 or codes.shape[1] != self.n_latents:
            raise FeaturekitError(
                f"codes must have shape (n, {self.n_latents}), got {tuple(codes.shape)}; "
                "flatten (batch, seq) into one token axis and use the dictionary this FeatureStats was made for"
            )
        n = codes.shape[0]
        if context_idx.shape != (n,) or position.shape != (n,):
            raise FeaturekitError(
                f"context_idx and position must have shape ({n},), got {tuple(context_idx.shape)} and "
                f"{tuple(position.shape)}; pass one context index and one position per row of codes"
            )
        self.n_tokens += n
        step = max(1, self.chunk_elements // self.n_latents)
        for a in range(0, n, step):
            self._update_chunk(codes[a:a + step].detach(), context_idx[a:a + step], position[a:a + step])

    def _update_chunk(self, codes: Tensor, context_idx: Tensor, position: Tensor) -> None:
        """Counts and max from the chunk's non-zero entries, then merge the few candidates."""
        rows, lats = codes.nonzero(as_tuple=True)
        vals = codes[rows, lats].float()
        self.counts += torch.bincount(lats, minlength=self.n_latents).to(self.device)
        chunk_max = torch.zeros(self.n_latents, device=codes.device).scatter_reduce_(0, lats, vals, "amax")
        self.max_act = torch.maximum(self.max_act, chunk_max.to(self.device))

        # Candidates: positive entries not below the latent's current k-th value (ties kept; the
        # exact merge resolves them). While lists are still filling and candidates outnumber the
        # slots, also drop entries below the chunk's own k-th largest value for that latent: each
        # has at least top_n entries of this chunk ranking ahead of it.
        floor = torch.where(self.top_context[:, -1] >= 0, self.top_values[:, -1], 0.0).to(codes.device)
        keep = (vals > 0) & (vals >= floor[lats])
        if int(keep.sum()) > self.n_latents * self.top_n:
            kth = codes.topk(min(self.top_n, codes.shape[0]), dim=0).values[-1].float()
            keep &= vals >= kth[lats]
        rows, lats, vals = rows[keep].to(self.device), lats[keep].to(self.device), vals[keep].to(self.device)
        if lats.numel():
            ctx = context_idx.to(self.device, torch.long)[rows]
            pos = position.to(self.device, torch.long)[rows]
            self._merge(lats, vals, ctx, pos)

    def _merge(self, lats: Tensor, vals: Tensor, ctx: Tensor, pos: Tensor) -> None:
        """Merge candidates into the top lists of the latents they touch, by sorting
        (latent, -value, context, position) and keeping the first top_n of each latent."""
        touched = torch.zeros(self.n_latents, dtype=torch.bool, device=self.device)
        touched[lats] = True
        old_lat, old_slot = ((self.top_context >= 0) & touched[:, None]).nonzero(as_tuple=True)
        lat = torch.cat([old_lat, lats])
        val = torch.cat([self.top_values[old_lat, old_slot], vals])
        c = torch.cat([self.top_context[old_lat, old_slot], ctx])
        p = torch.cat([self.top_position[old_lat, old_slot], pos])
        # Lexicographic order by two stable sorts on packed int64 keys, the minor key first. Every
        # value here is > 0, and positive float32 bit patterns sort like the floats themselves.
        minor = c * (int(p.max()) + 1) + p
        major = (lat << 31) | (0x7FFFFFFF - val.view(torch.int32).long())
        order = torch.sort(minor, stable=True).indices
        order = order[torch.sort(major[order], stable=True).indices]
        lat, val, c, p = lat[order], val[order], c[order], p[order]
        per_latent = torch.bincount(lat, minlength=self.n_latents)
        starts = torch.cumsum(per_latent, 0) - per_latent
        rank = torch.arange(lat.numel(), device=self.device) - starts[lat]
        keep = rank < self.top_n
        lat, rank = lat[keep], rank[keep]
        self.top_values[touched] = 0.0
        self.top_context[touched] = -1
        self.top_position[touched] = -1
        self.top_values[lat, rank] = val[keep]
        self.top_context[lat, rank] = c[keep]
        self.top_position[lat, rank] = p[keep]

    def density(self) -> Tensor:
        """Firing fraction per latent, ``counts / n_tokens`` (F,) float; zeros before any token."""
        return self.counts.double().div(max(self.n_tokens, 1)).float()

    def top(self, latent: int) -> list[tuple[float, int, int]]:
        """The latent's top examples ``(value, context_idx, position)``, value descending, values > 0 only."""
        if not 0 <= latent < self.n_latents:
            raise FeaturekitError(f"latent {latent} is out of range; use 0 <= latent < {self.n_latents}")
        vals = self.top_values[latent].tolist()
        ctxs = self.top_context[latent].tolist()
        poss = self.top_position[latent].tolist()
        return [(v, c, p) for v, c, p in zip(vals, ctxs, poss) if c >= 0 and v > 0]


def choose_latents(stats: FeatureStats, n: int, seed: int = 0) -> list[int]:
    """A seeded random sample of ``n`` live latents (density > 0), returned in ascending order."""
    live = torch.nonzero(stats.counts > 0).flatten().cpu()
    gen = torch.Generator().manual_seed(seed)
    picked = live[torch.randperm(live.numel(), generator=gen)[: max(n, 0)]]
    return sorted(picked.tolist())


def build_examples(
    stats: FeatureStats,
    latents: Sequence[int],
    input_ids: Tensor,
    decode_token: Callable[[int], str],
    activation_fn: ActivationFn | None = None,
    *,
    window: tuple[int, int] = (16, 4),
    batch_size: int = 16,
) -> list[dict]:
    """Top examples of ``latents`` as JSON-ready dicts (the format ``features/top_examples.json`` holds).

    For each example the window is ``window[0]`` tokens left of the peak and ``window[1]`` right of
    it (clipped to the context). ``activation_fn(context_indices) -> (m, T, F)`` recomputes the codes
    of a few contexts (it is called with at most ``batch_size`` contexts at once, and only for the
    contexts some chosen latent needs); its outputs give ``acts``, this latent's activation at every
    shown token. Without ``activation_fn``, ``acts`` holds the recorded peak and 0 elsewhere.

    Returns one dict per latent::

        {"index": f, "density": float, "max_act": float,
         "examples": [{"context": c, "position": p, "value": v, "tokens": [str, ...],
                       "acts": [float, ...], "max_pos": int (index of the peak in tokens)}, ...]}
    """
    if input_ids.dim() != 2:
        raise FeaturekitError(
            f"input_ids must be (N, T), got shape {tuple(input_ids.shape)}; pass the packed contexts "
            "whose context_idx values were given to FeatureStats.update"
        )
    n_ctx, seq_len = input_ids.shape
    latents = [int(f) for f in latents]
    tops = {f: stats.top(f) for f in latents}
    needed = sorted({c for top in tops.values() for _, c, _ in top})
    if needed and needed[-1] >= n_ctx:
        raise FeaturekitError(
            f"context {needed[-1]} is recorded in the stats but input_ids has only {n_ctx} contexts; "
            "pass the same input_ids the statistics were gathered on"
        )
    acts = _recompute(activation_fn, needed, latents, (seq_len, stats.n_latents), batch_size) if activation_fn else {}
    density = stats.density()
    left, right = window
    out = []
    for j, f in enumerate(latents):
        examples = []
        for value, c, p in tops[f]:
            lo, hi = max(0, p - left), min(seq_len, p + right + 1)
            if acts:
                shown = acts[c][lo:hi, j].tolist()
            else:
                shown = [value if t == p else 0.0 for t in range(lo, hi)]
            examples.append({
                "context": c, "position": p, "value": value,
                "tokens": [decode_token(int(t)) for t in input_ids[c, lo:hi].tolist()],
                "acts": shown, "max_pos": p - lo,
            })
        out.append({"index": f, "density": float(density[f]), "max_act": float(stats.max_act[f]),
                    "examples": examples})
    return out


def _recompute(fn: ActivationFn, contexts: list[int], latents: list[int], shape: tuple[int, int],
               batch_size: int) -> dict[int, Tensor]:
    """Map each needed context to its (T, len(latents)) activations of the chosen latents (CPU)."""
    columns = torch.tensor(latents, dtype=torch.long)
    acts: dict[int, Tensor] = {}
    for start in range(0, len(contexts), batch_size):
        chunk = contexts[start:start + batch_size]
        codes = fn(torch.tensor(chunk, dtype=torch.long))
        if tuple(codes.shape) != (len(chunk), *shape):
            raise FeaturekitError(
                f"activation_fn returned shape {tuple(codes.shape)} for {len(chunk)} contexts; it must "
                f"return codes of shape ({len(chunk)}, seq_len={shape[0]}, n_latents={shape[1]})"
            )
        picked = codes.detach()[..., columns.to(codes.device)].float().cpu()
        for i, c in enumerate(chunk):
            acts[c] = picked[i]
    return acts


def write_features(features_dir: str | Path, stats: FeatureStats, examples: list[dict] | None = None) -> None:
    """Write ``density.json`` ({"density": [...], "n_tokens": n}) and ``top_examples.json`` atomically."""
    features_dir = Path(features_dir)
    atomic_write_json(features_dir / "density.json",
                      {"n_tokens": stats.n_tokens, "density": stats.density().tolist()})
    if examples is not None:
        atomic_write_json(features_dir / "top_examples.json", examples)
