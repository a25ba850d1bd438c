"""The whole job, step by step: harvest → train → evaluate → report, all inside one run directory.

    runs/NAME/config.json          the resolved config (reproduces the run)
    runs/NAME/activations/         the activation cache (sharded safetensors + manifest.json)
    runs/NAME/checkpoint/          the trainer's resumable state
    runs/NAME/metrics.jsonl        training curves
    runs/NAME/dictionary/          model.safetensors + featurekit.json
    runs/NAME/eval.json            held-out metrics
    runs/NAME/features/            density.json, top_examples.json
    runs/NAME/report.html          the report
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import torch

from . import __version__
from ._io import atomic_write_json, read_json
from .config import RunConfig, from_dict
from .data.cache import ActivationCache, write_cache
from .data.harvest import choose_dtype, harvest
from .data.shuffle import ShuffleBuffer, batches_per_epoch, iter_epochs
from .data.sources import load_texts
from .data.tokens import pack, token_mask
from .dictionaries import Dictionary, build, load, save
from .errors import FeaturekitError
from .evaluate.splice import reconstruction_eval, splice_eval
from .features.examples import FeatureStats, build_examples, choose_latents, write_features
from .models import load_model
from .models.hooks import capture_activations
from .models.loading import LoadedModel
from .models.sites import parse_site, site_dim
from .report import write_report
from .train import Trainer

INIT_SAMPLE_TOKENS = 32_768


def resolve(cfg: RunConfig) -> RunConfig:
    """Fill the config's automatic values so the saved config.json states every number."""
    cfg = copy.deepcopy(cfg)
    parse_site(cfg.site)  # bad syntax fails before anything is written
    total = cfg.train.epochs * cfg.data.train_tokens
    if cfg.train.dead_tokens is None:
        cfg.train.dead_tokens = max(cfg.train.batch_size, min(10_000_000, total // 4))
    return cfg


def save_config(cfg: RunConfig) -> None:
    atomic_write_json(cfg.run_dir / "config.json", cfg.to_dict())


def load_run_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FeaturekitError(f"{run_dir} is not a run directory: config.json is missing")
    return from_dict(RunConfig, read_json(path))


def open_model(cfg: RunConfig) -> LoadedModel:
    """Load the configured model and check that the configured site exists in it."""
    dtype = choose_dtype(cfg.model.dtype, cfg.model.device)
    loaded = load_model(cfg.model.name, dtype=dtype, device=cfg.model.device)
    site_dim(loaded.model, cfg.site)  # an unknown site fails here, listing the valid ones
    return loaded


def contexts(loaded: LoadedModel, cfg: RunConfig, split: str, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed contexts of `split` and their token mask, cut so the mask keeps at most n_tokens."""
    per_context = max(1, cfg.data.context_len - 1)
    ids = pack(load_texts(cfg.data.source, split), loaded.tokenizer, cfg.data.context_len,
               max_contexts=math.ceil(1.05 * n_tokens / per_context) + 1)
    mask = token_mask(ids, loaded.tokenizer, exclude_first=cfg.data.exclude_first, exclude_special=cfg.data.exclude_special)
    over = mask.flatten().cumsum(0) > n_tokens
    mask = mask & ~over.view_as(mask)
    used = int(mask.any(1).nonzero().max()) + 1 if mask.any() else 0
    return ids[:used], mask[:used]


def token_policy(cfg: RunConfig) -> dict:
    return {"exclude_first": cfg.data.exclude_first, "exclude_special": cfg.data.exclude_special,
            "max_norm_multiple": cfg.data.max_norm_multiple}


# -- steps ------------------------------------------------------------------------------------------
def run_harvest(cfg: RunConfig, loaded: LoadedModel | None = None, progress: bool = True) -> ActivationCache:
    """Harvest the training activations into runs/NAME/activations (resumes an interrupted harvest)."""
    loaded = loaded or open_model(cfg)
    ids, mask = contexts(loaded, cfg, "train", cfg.data.train_tokens)
    meta = {
        "model": cfg.model.name, "sites": [cfg.site], "dtype": str(loaded.model.dtype).removeprefix("torch."),
        "source": cfg.data.source, "split": "train", "context_len": cfg.data.context_len,
        "token_policy": token_policy(cfg), "tokens": cfg.data.train_tokens,
    }
    stream = harvest(loaded.model, ids, [cfg.site], batch_size=cfg.data.harvest_batch, mask=mask, progress=progress,
                     max_norm_multiple=cfg.data.max_norm_multiple)
    return write_cache(cfg.run_dir / "activations", stream, meta, cfg.data.shard_tokens)


def run_train(cfg: RunConfig, resume: bool = False, progress: bool = True, loaded: LoadedModel | None = None) -> Dictionary:
    """Train the dictionary; `resume` continues from the checkpoint.

    With `data.cache` (the default) batches come from the run's activation cache. Without it they
    are streamed: every epoch harvests the training contexts again straight into the shuffle buffer
    (nothing on disk; memory bounded by the buffer). A streamed epoch is cut to
    ⌊0.99 · kept tokens / batch_size⌋ batches, the slack absorbing tokens dropped as norm outliers.
    """
    tc = cfg.train
    if cfg.data.cache:
        cache = ActivationCache(cfg.run_dir / "activations")
        if not cache.complete:
            raise FeaturekitError(f"the activation cache in {cache.dir} is incomplete; run `featurekit harvest` to finish it")
        d, per_epoch, harvest_dtype = cache.d(cfg.site), batches_per_epoch(cache.n_tokens, tc.batch_size), cache.meta.get("dtype")

        def stream() -> Iterator[torch.Tensor]:
            return iter_epochs(cache, cfg.site, tc.epochs, tc.buffer_tokens, tc.batch_size, tc.seed)

        def sample() -> torch.Tensor:
            return _first_tokens(cache.iter_shards(sites=[cfg.site]), cfg.site, INIT_SAMPLE_TOKENS)
    else:
        loaded = loaded or open_model(cfg)
        ids, mask = contexts(loaded, cfg, "train", cfg.data.train_tokens)
        d, per_epoch = site_dim(loaded.model, cfg.site), int(0.99 * int(mask.sum())) // tc.batch_size
        harvest_dtype = str(loaded.model.dtype).removeprefix("torch.")

        def harvested() -> Iterator:
            return harvest(loaded.model, ids, [cfg.site], batch_size=cfg.data.harvest_batch, mask=mask,
                           progress=False, max_norm_multiple=cfg.data.max_norm_multiple)

        def stream() -> Iterator[torch.Tensor]:
            for epoch in range(tc.epochs):
                shuffled = ShuffleBuffer(harvested(), cfg.site, tc.buffer_tokens, tc.batch_size, tc.seed + epoch)
                yield from itertools.islice(shuffled, per_epoch)

        def sample() -> torch.Tensor:
            return _first_tokens(harvested(), cfg.site, INIT_SAMPLE_TOKENS)

    dc = cfg.dictionary
    params = {"k": dc.k} if dc.method == "topk" else {"l1_coefficient": dc.l1_coefficient} if dc.method == "relu" else {}
    sae = build(dc.method, d, dc.n_latents, seed=tc.seed, **params)
    total_steps = tc.epochs * per_epoch
    if total_steps == 0:
        raise FeaturekitError(f"fewer training tokens than one batch of {tc.batch_size}; harvest more or lower train.batch_size")
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    trainer = Trainer(sae, tc, cfg.run_dir, total_steps)
    if resume:
        trainer.resume()
    else:
        trainer.init_from_data(sample())
    start = time.time()
    summary = trainer.fit(stream(), progress=progress)
    save_dictionary(sae, cfg, harvest_dtype, summary, time.time() - start)
    return sae


def save_dictionary(sae: Dictionary, cfg: RunConfig, harvest_dtype: str | None, summary: dict, seconds: float) -> Path:
    """Save a folded copy (runs on raw activations) to runs/NAME/dictionary."""
    out = copy.deepcopy(sae)
    training_scale = float(out.input_scale)
    out.fold_input_scale()
    extra = {}
    if hasattr(out, "fold_decoder_norms"):
        out.fold_decoder_norms()
        extra["decoder_norms_folded"] = True
    meta = {
        "normalization": {"training_scale": training_scale, "rule": f"{cfg.train.normalize}: c = sqrt(d) / mean ||x|| on {INIT_SAMPLE_TOKENS} tokens", **extra},
        "source": {"model": cfg.model.name, "site": cfg.site, "d_model": sae.d_in, "harvest_dtype": harvest_dtype,
                   "corpus": cfg.data.source, "context_len": cfg.data.context_len},
        "special_tokens": token_policy(cfg),
        "provenance": {"featurekit_version": __version__, "tokens_seen": summary["tokens"], "steps": summary["steps"],
                       "train_seconds": round(seconds, 1), "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                       "config": dataclasses.asdict(cfg.train)},
    }
    return save(out, cfg.run_dir / "dictionary", meta)


def run_eval(cfg: RunConfig, loaded: LoadedModel | None = None, progress: bool = True) -> dict:
    """Held-out reconstruction metrics, splice CE/KL and feature examples → eval.json, features/."""
    loaded = loaded or open_model(cfg)
    sae = load(cfg.run_dir / "dictionary")
    ids, mask = contexts(loaded, cfg, "test", cfg.eval.tokens)
    stats = FeatureStats(sae.n_latents, top_n=cfg.report.top_n)

    def eval_batches() -> Iterator[torch.Tensor]:
        for batch in harvest(loaded.model, ids, [cfg.site], batch_size=cfg.eval.batch_contexts, mask=mask, progress=progress,
                             max_norm_multiple=cfg.data.max_norm_multiple):
            x = batch.acts[cfg.site].float()
            stats.update(sae.encode(x), batch.context_idx, batch.position)
            yield x

    result = {"site": cfg.site, "model": cfg.model.name, "dtype": str(loaded.model.dtype).removeprefix("torch."),
              "split": "test", "token_policy": token_policy(cfg)}
    recon = reconstruction_eval(sae, eval_batches())
    recon.pop("density")
    result.update(recon)
    result["norm_outliers_excluded"] = int(mask.sum()) - recon["n_tokens"]
    n_splice = min(cfg.eval.splice_contexts, len(ids))
    result.update(splice_eval(loaded.model, sae, cfg.site, ids[:n_splice], mask[:n_splice], cfg.eval.batch_contexts, progress,
                              max_norm_multiple=cfg.data.max_norm_multiple))
    atomic_write_json(cfg.run_dir / "eval.json", result)

    @torch.no_grad()
    def activation_fn(context_indices: torch.Tensor) -> torch.Tensor:
        acts = capture_activations(loaded.model, ids[context_indices], [cfg.site])[cfg.site].float()
        return sae.encode(acts) * mask[context_indices, :, None]

    latents = choose_latents(stats, cfg.report.n_features, seed=cfg.train.seed)
    examples = build_examples(stats, latents, ids, lambda t: loaded.tokenizer.decode([t]), activation_fn)
    write_features(cfg.run_dir / "features", stats, examples)
    return result


def run_all(cfg: RunConfig, progress: bool = True) -> Path:
    """The main job. Returns the report's path."""
    cfg = resolve(cfg)
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg)
    loaded = open_model(cfg)
    if cfg.data.cache:
        run_harvest(cfg, loaded, progress)
    resume = (cfg.run_dir / "checkpoint" / "state.json").is_file() and not (cfg.run_dir / "dictionary").exists()
    run_train(cfg, resume=resume, progress=progress, loaded=loaded)
    run_eval(cfg, loaded, progress)
    return write_report(cfg.run_dir)


def _first_tokens(batches: Iterable, site: str, n: int) -> torch.Tensor:
    rows, have = [], 0
    for batch in batches:
        rows.append(batch.acts[site].float())
        have += rows[-1].shape[0]
        if have >= n:
            break
    return torch.cat(rows)[:n]
