"""Building the feature store: one streaming pass of the model and the dictionary over a token budget.

`build_store(model, tokenizer, dictionary, ids, mask, ...)`:

1. **The pass.** The packed contexts `ids` (with their token `mask`) run through the model to the
   dictionary's site, batch by batch; the codes of each batch are made sparse in row chunks (a dense
   (tokens × latents) matrix is never held for a whole batch) and feed `FeatureStatistics`. The sparse
   codes are also written to a scratch folder, so that the examples' per-token activations later come
   from what the pass computed — the model runs once.
2. **Processes.** Under torchrun each rank takes a contiguous share of the contexts; rank 0 merges the
   statistics (exactly: `stats.py`), names the examples it keeps, and each rank sends the activations
   of those examples that lie in its contexts.
3. **Assembly** (rank 0): the examples' per-token activations, logit effects and decoder neighbours
   (`effects.py`), token texts, and the store file (`store.py`), written beside the old one and renamed
   over it.

`build_stores` does the same for several dictionaries (e.g. every layer of a transcoder set) from one pass:
the harvest captures all their sites at once, each batch feeds every dictionary's statistics and spill.

Memory does not grow with the number of tokens (the statistics are bounded, the scratch codes are on
disk: tokens × L0 × 6 bytes).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..data.harvest import harvest
from .effects import decoder_neighbours, logit_effects
from .stats import BINS, FeatureStatistics, bin_edges, cofire_rate_for
from .store import SCHEMA_VERSION, StoreWriter, pack_acts, pack_ids

CHUNK_ELEMENTS = 1 << 22  # codes made dense at once while encoding (rows × latents)
N_BANDS = 5
TOKENS_INDEXED = 64  # per feature, its most frequent tokens enter the search-by-token index


def sparse_codes(dictionary: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rows, latents, values) of the non-zero codes of x (n, d), encoded in row chunks."""
    step = max(1, CHUNK_ELEMENTS // dictionary.n_latents)
    rows, lats, vals = [], [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], step):
            codes = dictionary.encode(x[start:start + step].float())
            r, lat = codes.nonzero(as_tuple=True)
            rows.append(r + start)
            lats.append(lat)
            vals.append(codes[r, lat].float())
    return torch.cat(rows).cpu(), torch.cat(lats).cpu(), torch.cat(vals).cpu()


class CodeSpill:
    """The pass's sparse codes on disk, one file per batch, by context: what the examples are cut from."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: list[tuple[int, int, Path]] = []  # (first context, last context, file)

    def write(self, context: torch.Tensor, position: torch.Tensor, rows: torch.Tensor, lats: torch.Tensor, vals: torch.Tensor) -> None:
        path = self.folder / f"codes_{len(self.files):06d}.safetensors"
        save_file({"ctx": context[rows].long(), "pos": position[rows].short(), "lat": lats.int(), "val": vals.float()}, path)
        self.files.append((int(context.min()), int(context.max()), path))

    def activations(self, wanted: dict[int, set[int]]) -> dict[tuple[int, int], tuple[list[int], list[float]]]:
        """(context, latent) → (positions, values) of that latent's non-zero codes on that context, for every
        latent in `wanted[context]`."""
        out = {}
        for first, last, path in self.files:
            here = {c: lats for c, lats in wanted.items() if first <= c <= last}
            if not here:
                continue
            t = load_file(path)
            ctx_of = torch.tensor(sorted(here))
            sel = torch.isin(t["ctx"], ctx_of)
            ctx, pos, lat, val = t["ctx"][sel], t["pos"][sel].long(), t["lat"][sel].long(), t["val"][sel]
            for c, p, f, v in zip(ctx.tolist(), pos.tolist(), lat.tolist(), val.tolist()):
                if f in here[c]:
                    entry = out.setdefault((c, f), ([], []))
                    entry[0].append(p)
                    entry[1].append(v)
        return out


@dataclass
class StoreJob:
    """One dictionary's store in a pass (`build_stores`): its dictionary, the store file to write, the site its
    codes are read from, `meta` recorded as is, and `extra(feature)` for a feature's extra JSON."""

    dictionary: Any
    out: Path
    site: str
    meta: dict[str, Any]
    extra: Callable[[int], dict] | None = None


def build_store(model: Any, tokenizer: Any, dictionary: Any, ids: torch.Tensor, mask: torch.Tensor, out: Path, *,
                site: str, meta: dict[str, Any], max_norm_multiple: float | None = None, batch_contexts: int = 16,
                top_n: int = 20, band_n: int = 5, cofire_tokens: int = 16_384, progress: bool = True,
                extra: Callable[[int], dict] | None = None, distributed: Any = None,
                batches: Iterable[Any] | None = None) -> Path | None:
    """The store of `dictionary` over the contexts `ids` (N, T) with their `mask` (module docstring), written to
    `out`. `meta` is recorded as is beside what the build measures; `extra(feature)` adds a feature's extra JSON
    (e.g. attention-head shares). `distributed`: the `train.distributed` module under torchrun (None: one process).
    `batches`: the pass's `ActivationBatch`es made elsewhere (a vision run's views, one process; `ids` then holds
    each context's token kinds and `model` may be None: no logit effects) instead of the text harvest.
    Returns the store's path (None on ranks other than 0)."""
    return build_stores(model, tokenizer, [StoreJob(dictionary, out, site, meta, extra)], ids, mask,
                        max_norm_multiple=max_norm_multiple, batch_contexts=batch_contexts, top_n=top_n, band_n=band_n,
                        cofire_tokens=cofire_tokens, progress=progress, distributed=distributed, batches=batches)[0]


def build_stores(model: Any, tokenizer: Any, jobs: list[StoreJob], ids: torch.Tensor, mask: torch.Tensor, *,
                 max_norm_multiple: float | None = None, batch_contexts: int = 16, top_n: int = 20, band_n: int = 5,
                 cofire_tokens: int = 16_384, progress: bool = True, distributed: Any = None,
                 batches: Iterable[Any] | None = None) -> list[Path | None]:
    """The stores of several dictionaries from ONE pass of the model (`build_store` is the one-job case): the
    harvest captures every job's site at once and each batch's activations feed every job's statistics and code
    spill; then each store is assembled and written in turn. With `max_norm_multiple` a token is dropped when its
    norm is an outlier at any of the sites (the harvest keeps the same tokens at all sites). Returns the stores'
    paths in the jobs' order (None on ranks other than 0)."""
    n_ctx, context_len = ids.shape
    world, rank = (distributed.world_size(), distributed.rank()) if distributed and distributed.is_initialized() else (1, 0)
    start, stop = rank * n_ctx // world, (rank + 1) * n_ctx // world
    vocab = max(len(tokenizer), int(ids.max()) + 1)
    total = int(mask.sum())
    scratch = Path(tempfile.mkdtemp(prefix="featurekit-store-"))
    try:
        parts = []
        for i, job in enumerate(jobs):
            (scratch / str(i)).mkdir()
            stats = FeatureStatistics(job.dictionary.n_latents, context_len, vocab, signed=job.dictionary.signed, top_n=top_n,
                                      band_n=band_n, cofire_rate=cofire_rate_for(total, cofire_tokens))
            device = next(job.dictionary.parameters(), torch.empty(0)).device
            parts.append((job, stats, CodeSpill(scratch / str(i)), device))
        if batches is None:
            sites = list(dict.fromkeys(job.site for job in jobs))
            batches = harvest(model, ids[start:stop], sites, batch_size=batch_contexts, mask=mask[start:stop],
                              progress=progress and rank == 0, max_norm_multiple=max_norm_multiple)
        for batch in batches:
            context = batch.context_idx + start
            for job, stats, spill, device in parts:
                rows, lats, vals = sparse_codes(job.dictionary, batch.acts[job.site].to(device))
                stats.update(rows, lats, vals, context, batch.position, batch.token_ids)
                spill.write(context, batch.position, rows, lats, vals)
        return [_finish(job, stats, spill, ids, tokenizer, model, distributed, world, rank) for job, stats, spill, _ in parts]
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _finish(job: StoreJob, stats: FeatureStatistics, spill: CodeSpill, ids: torch.Tensor, tokenizer: Any, model: Any,
            distributed: Any, world: int, rank: int) -> Path | None:
    """Merge the ranks' statistics, cut the examples and write one job's store (rank 0)."""
    if world > 1:
        gathered = distributed.gather_objects(stats)
        if rank == 0:
            for other in gathered[1:]:
                stats.merge(other)
    wanted = chosen_examples(stats) if rank == 0 else None
    if world > 1:
        wanted = distributed.broadcast_object(wanted)
    acts = spill.activations(wanted_by_context(wanted))
    if world > 1:
        parts = distributed.gather_objects(acts)
        if rank != 0:
            return None
        acts = {k: v for part in parts for k, v in part.items()}
    return write(job.out, stats, wanted, acts, ids, tokenizer, job.dictionary, model, job.site, job.meta, job.extra)


def chosen_examples(stats: FeatureStatistics) -> dict[int, list[tuple[str, int, int, int, float]]]:
    """feature → its examples (kind, rank, context, position, value): the top (and, signed, bottom) activations and
    the samples of its activation-quantile bands (`band0`… lowest first; `negband0`… for the negative tail)."""
    T = stats.context_len
    out: dict[int, list] = {}
    for f in torch.nonzero(stats.fires > 0).flatten().tolist():
        picks = [("top", stats.top.entries(f))] + ([("bottom", stats.bottom.entries(f))] if stats.bottom is not None else [])
        for sign, prefix in ((0, "band"), (1, "negband")):
            picks += [(f"{prefix}{b}", band) for b, band in enumerate(stats.band_samples(f, sign, N_BANDS))]
        out[f] = [(kind, r, key // T, key % T, value) for kind, entries in picks for r, (_, key, value) in enumerate(entries)]
    return out


def wanted_by_context(chosen: dict[int, list]) -> dict[int, set[int]]:
    """context → the features whose examples lie in it."""
    out: dict[int, set[int]] = {}
    for f, rows in chosen.items():
        for _, _, context, _, _ in rows:
            out.setdefault(context, set()).add(f)
    return out


def write(out: Path, stats: FeatureStatistics, chosen: dict[int, list], acts: dict, ids: torch.Tensor, tokenizer: Any,
          dictionary: Any, model: Any, site: str, meta: dict[str, Any], extra: Callable[[int], dict] | None) -> Path:
    """Assemble and write the store (rank 0)."""
    T = ids.shape[1]
    writer = StoreWriter(out)
    try:
        n_lat = dictionary.n_latents
        top_tokens, cofire = stats.top_tokens(10), stats.cofiring(10)
        effects = logit_effects(model, dictionary.W_dec, meta.get("output_site") or site, top=10) if model is not None else None
        nb_ids, nb_cos = decoder_neighbours(dictionary.W_dec, k=10)
        density = stats.density()
        referenced: set[int] = set()
        rows = []
        for f in range(n_lat):
            fires = int(stats.fires[f])
            tt = [(t, c, round(m, 6)) for t, c, m in top_tokens.get(f, [])]
            lp = ln = None
            if effects is not None:
                lp = [(int(i), round(float(v), 4)) for i, v in zip(effects[0][f], effects[1][f])]
                ln = [(int(i), round(float(v), 4)) for i, v in zip(effects[2][f], effects[3][f])]
                referenced.update(i for i, _ in lp + ln)
            referenced.update(t for t, _, _ in tt)
            hist = stats.histogram(f)
            rows.append((f, fires, float(density[f]), float(stats.sum[f]) / fires if fires else None,
                         float(stats.max[f]) if fires else None, float(stats.min[f]) if fires else None,
                         {k: v for k, v in hist.items() if any(v)}, tt, cofire.get(f, []), lp, ln,
                         [(int(i), round(float(c), 4)) for i, c in zip(nb_ids[f], nb_cos[f])], extra(f) if extra else None))
        writer.features(rows)
        contexts = sorted({c for rows_ in chosen.values() for _, _, c, _, _ in rows_})
        writer.contexts((c, pack_ids(ids[c].tolist())) for c in contexts)
        for c in contexts:
            referenced.update(ids[c].tolist())
        writer.examples((f, kind, rank, c, p, value, pack_acts(*acts.get((c, f), ([], []))))
                        for f, rows_ in chosen.items() for kind, rank, c, p, value in rows_)
        writer.token_features((t, f, c, m) for f, row in stats.top_tokens(TOKENS_INDEXED).items() for t, c, m in row)
        referenced = sorted(referenced)
        texts = tokenizer.batch_decode([[i] for i in referenced]) if referenced else []
        writer.tokens(zip(referenced, texts))
        writer.meta({**meta, "schema_version": SCHEMA_VERSION, "n_latents": n_lat, "d_in": dictionary.d_in,
                     "method": dictionary.method, "signed": bool(dictionary.signed), "n_tokens": stats.n_tokens,
                     "context_len": T, "n_contexts": int(ids.shape[0]), "hist_edges": bin_edges(), "hist_bins": BINS,
                     "top_n": stats.top_n, "band_n": stats.band_n, "bands": N_BANDS,
                     "token_counts_exact": stats.tokens.exact, "cofire_tokens": stats.cofire_tokens,
                     "cofire_exact": stats.cofire.exact, "logit_effects": effects is not None,
                     "featurekit_version": __version__, "built": datetime.now(timezone.utc).isoformat(timespec="seconds")})
        return writer.commit()
    except BaseException:
        writer.abort()
        raise

