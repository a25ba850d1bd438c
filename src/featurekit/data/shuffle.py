"""Token-level shuffling of an activation stream with bounded memory.

Neighbouring tokens of one context have correlated activations; training on them in order biases
each step. `ShuffleBuffer` mixes tokens across contexts and shards:

  1. rows of the stream fill a preallocated float32 buffer of `buffer_tokens` rows;
  2. when it is full, a random permutation of the buffer picks k = max(batch_size,
     ⌊buffer_tokens / 2 / batch_size⌋ · batch_size) rows — about half — which are emitted as k /
     batch_size batches (sampling without replacement); their slots are refilled from the stream;
  3. when the stream ends, the rows still in the buffer are emitted in a random order. With
     `drop_last=True` (default) a final batch smaller than batch_size is dropped, so every batch
     has exactly batch_size rows and an epoch of n tokens gives ⌊n / batch_size⌋ batches; with
     `drop_last=False` it is yielded and every token comes out exactly once.

Memory: the buffer plus the incoming batch plus the batch being emitted, whatever the stream length.
Randomness comes only from a `torch.Generator` seeded with `seed`, so the output is a deterministic
function of (seed, input order). Training resumes exactly by iterating again and skipping the batches
already consumed (`iter_epochs(..., skip_batches=n)` does it without reading skipped epochs).
Non-finite activations raise FeaturekitError: they would poison every dictionary trained on them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence

import torch

from featurekit.data.batch import ActivationBatch
from featurekit.errors import FeaturekitError


class ShuffleBuffer:
    """Iterable of (batch_size, d) float32 tensors: the rows of `batches[*].acts[site]`, shuffled.

    `site` may be a list of names (e.g. a site and its gradient, `models.hooks.gradient_key`): each
    row is then the concatenation of those tensors for one token, (batch_size, Σ d), shuffled as a unit.
    """

    def __init__(self, batches: Iterable[ActivationBatch], site: str | Sequence[str], buffer_tokens: int, batch_size: int,
                 seed: int, drop_last: bool = True):
        if batch_size < 1 or buffer_tokens < batch_size:
            raise FeaturekitError(f"need 1 <= batch_size <= buffer_tokens (got batch_size={batch_size}, "
                                  f"buffer_tokens={buffer_tokens}): raise buffer_tokens or lower batch_size")
        self.sites = [site] if isinstance(site, str) else list(site)
        self.batches, self.site = batches, "+".join(self.sites)
        self.buffer_tokens, self.batch_size = int(buffer_tokens), int(batch_size)
        self.seed, self.drop_last = int(seed), drop_last
        self.k = max(batch_size, buffer_tokens // 2 // batch_size * batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        buf: torch.Tensor | None = None
        free = torch.arange(self.buffer_tokens)  # slots to fill next, in this order
        n_free_used = 0                           # free[:n_free_used] are filled
        for x in self._rows():
            if buf is None:
                buf = torch.empty(self.buffer_tokens, x.shape[1], dtype=torch.float32)
            elif x.shape[1] != buf.shape[1]:
                raise FeaturekitError(f"site {self.site!r}: a batch has width {x.shape[1]}, earlier ones "
                                      f"{buf.shape[1]}: every batch must come from the same site and model")
            pos = 0
            while pos < x.shape[0]:
                m = min(free.numel() - n_free_used, x.shape[0] - pos)
                buf[free[n_free_used:n_free_used + m]] = x[pos:pos + m]
                n_free_used += m
                pos += m
                if n_free_used == free.numel():  # buffer full: emit about half of it
                    out = torch.randperm(self.buffer_tokens, generator=gen)[:self.k]
                    for i in range(0, self.k, self.batch_size):
                        yield buf[out[i:i + self.batch_size]]
                    free, n_free_used = out, 0
        if buf is None:
            return
        filled = _filled_slots(self.buffer_tokens, free, n_free_used)
        rest = filled[torch.randperm(filled.numel(), generator=gen)]
        for i in range(0, rest.numel(), self.batch_size):
            idx = rest[i:i + self.batch_size]
            if idx.numel() == self.batch_size or not self.drop_last:
                yield buf[idx]

    def _rows(self) -> Iterator[torch.Tensor]:
        for batch in self.batches:
            for site in self.sites:
                if site not in batch.acts:
                    raise FeaturekitError(f"site {site!r} is not in the activation batches (they have "
                                          f"{sorted(batch.acts)}): pick one of those sites")
                if batch.acts[site].ndim != 2:
                    raise FeaturekitError(f"site {site!r}: activations must be (n, d), got {tuple(batch.acts[site].shape)}")
            parts = [batch.acts[site].to(torch.float32) for site in self.sites]
            x = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
            # One sum is cheaper than an elementwise check; NaN/Inf anywhere makes the sum non-finite.
            bad = 0 if torch.isfinite(x.sum()) else int((~torch.isfinite(x)).any(dim=1).sum())
            if bad:
                raise FeaturekitError(
                    f"site {self.site!r}: {bad} token(s) have NaN/Inf activations. Check the model dtype (float16 "
                    "overflows: use float32 or bfloat16) and exclude position 0 / special tokens from the mask")
            if x.shape[0]:
                yield x


def _filled_slots(n: int, free: torch.Tensor, n_free_used: int) -> torch.Tensor:
    """Buffer slots that hold a not-yet-emitted row, in increasing order."""
    empty = torch.zeros(n, dtype=torch.bool)
    empty[free[n_free_used:]] = True
    return torch.nonzero(~empty).flatten()


def batches_per_epoch(n_tokens: int, batch_size: int, drop_last: bool = True) -> int:
    """Number of batches a ShuffleBuffer yields for a stream of n_tokens rows."""
    return n_tokens // batch_size if drop_last else -(-n_tokens // batch_size)


def iter_epochs(cache, site: str | Sequence[str], epochs: int, buffer_tokens: int, batch_size: int, seed: int, *,
                drop_last: bool = True, skip_batches: int = 0, verify: bool = True) -> Iterator[torch.Tensor]:
    """Shuffled (batch_size, d) float32 batches of `site` over `epochs` passes through `cache`.

    Epoch e reads the shards in the order `torch.randperm(n_shards, generator=Generator().manual_seed(seed + e))`
    through a fresh ShuffleBuffer seeded with seed + e, so each epoch is a deterministic function of
    (cache, seed, e) and sees every token once (minus a dropped partial batch). `skip_batches` drops the
    first batches of the whole sequence to resume a run: whole epochs are skipped without reading them.
    """
    per_epoch = batches_per_epoch(cache.n_tokens, batch_size, drop_last)
    first_epoch, skip = (skip_batches // per_epoch, skip_batches % per_epoch) if per_epoch else (epochs, 0)
    for epoch in range(first_epoch, epochs):
        gen = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(cache.n_shards, generator=gen).tolist()
        shards = cache.iter_shards(order=order, verify=verify, sites=[site] if isinstance(site, str) else list(site))
        stream = iter(ShuffleBuffer(shards, site, buffer_tokens, batch_size, seed + epoch, drop_last))
        yield from itertools.islice(stream, skip, None)
        skip = 0
